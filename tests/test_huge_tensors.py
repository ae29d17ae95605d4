"""Huge tensors (GPU only): B*H*L*D > 2^31 elements, where a 32-bit pointer offset would wrap.

Every kernel, inference and training, adds a 64-bit per-head base (``head_base``, ``i_bh.to(tl.int64)``) to 32-bit
offsets inside the head, which stay below (2048 key blocks x 256 rows) x 256 padded channels = 2^27 (the selection
kernel's limit). These tests run such a shape through the Triton paths and compare the last batch's last heads, the
farthest from the base pointer, with the torch reference computed on that slice alone; the NaN-poisoned output must
be written everywhere.
"""

import pytest
import torch

from sagesla.kernels.linear_attn_ref import linear_attn_ref
from sagesla.kernels.sla_train import sla_train
from sagesla.kernels.sparse_attn_ref import sparse_attn_ref
from sagesla.settings import SLASettings
from sagesla.testing import TOL_KERNEL_FP8, TOL_PIPELINE_HALF, TOL_PIPELINE_SLA, assert_close, run_forward

# Wan2.1-14B 720p (H40 L75600 D128) at batch 6: 2.32e9 elements per tensor.
SHAPE = (6, 40, 75600, 128)
# q, k, v and the output in bf16, INT8 Q and K, FP8 V (2.3 GB each) and the block scores: ~26 GB; the slice's
# reference gathers ~5 GB more.
NEEDS_BYTES = 40 * 2**30
SLICE_HEADS = 2


def _huge_inputs(shape: tuple[int, ...], needs_bytes: int) -> tuple[torch.Tensor, ...]:
    """q, k, v (bf16) of ``shape``, proj_l weight and bias; skips when the GPU has less than ``needs_bytes`` free."""
    assert SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3] > 2**31
    # Blocks the allocator caches for earlier tests in the run count as used: on an 80 GB H100 they can leave less
    # than ``needs_bytes`` "free" and skip a test that fits once they are returned.
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    if free < needs_bytes:
        pytest.skip(f"needs {needs_bytes / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    d = shape[-1]
    w = torch.randn(d, d, generator=gen, device="cuda") * 0.02
    return q, k, v, w, torch.randn(d, generator=gen, device="cuda") * 0.02


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("quantized,pv", [(True, "fp8"), (True, "half"), (False, "half")], ids=["fp8", "half", "sla"])
def test_huge_tensor_slice_matches_reference(layout, quantized, pv):
    batch, heads, length, head_dim = SHAPE
    q, k, v, w, b = _huge_inputs(SHAPE if layout == "HND" else (batch, length, heads, head_dim), NEEDS_BYTES)
    block_q, block_k = SLASettings(quantized=quantized).default_block_sizes(q.device)
    options = {"topk": 0.05, "quantized": quantized, "pv_precision": pv, "block_q": block_q, "block_k": block_k}
    o, lut = run_forward("triton", q, k, v, tensor_layout=layout, proj_weight=w, proj_bias=b, **options)
    assert torch.isfinite(o).all(), "output rows left unwritten (NaN poison) or non-finite"

    hnd = [x if layout == "HND" else x.transpose(1, 2) for x in (q, k, v, o)]
    tail = (slice(batch - 1, batch), slice(heads - SLICE_HEADS, heads))
    slice_qkv = (x[tail].contiguous() for x in hnd[:3])
    o_ref, lut_ref = run_forward("torch", *slice_qkv, proj_weight=w, proj_bias=b, **options)
    # Pools summed in another order may swap two near-equal blocks; compare the query blocks that agree.
    agree = (lut[tail] == lut_ref).all(dim=-1)
    assert agree.float().mean() >= 0.99
    rows = agree.repeat_interleave(block_q, dim=-1)[..., :length]
    tol = TOL_PIPELINE_SLA if not quantized else TOL_KERNEL_FP8 if pv == "fp8" else TOL_PIPELINE_HALF
    name = f"last heads of B{batch} H{heads} L{length} [{layout}, {pv if quantized else 'sla'}]"
    assert_close(name, o_ref[rows], hnd[3][tail][rows], tol)


# The training forward keeps q, k, v, out (bf16) and the LSE; its backward adds dq, dk, dv (bf16), the linear
# branch's fp32 dq share and dLoss/dout: ~47 GB; the slice's fp32 reference with autograd ~8 GB more.
NEEDS_BYTES_TRAIN = 64 * 2**30
# Gradients of the trainable kernels against fp32 autograd of the references (tests/kernels/test_sla_train.py's
# bf16 bound).
TOL_GRAD_BF16 = 2e-2


@pytest.mark.gpu
@pytest.mark.slow
def test_huge_tensor_training_gradients_on_a_slice():
    """Forward and backward of the trainable kernels at B*H*L*D > 2^31; the last head's dq, dk, dv (the only
    non-zero dLoss/dout is there) against fp32 autograd of the references with the same selection."""
    q, k, v, w, b = _huge_inputs(SHAPE, NEEDS_BYTES_TRAIN)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    block_q, block_k = SLASettings(quantized=False).default_block_sizes(q.device)
    scale = SHAPE[-1] ** -0.5
    o, lut = sla_train(
        q, k, v, topk=0.05, block_q=block_q, block_k=block_k, sm_scale=scale, feature_map="softmax",
        linear_scope="all", proj_weight=w, proj_bias=b,
    )  # fmt: skip
    tail = (slice(SHAPE[0] - 1, SHAPE[0]), slice(SHAPE[1] - 1, SHAPE[1]))
    grad = torch.zeros_like(o)
    grad[tail] = torch.randn_like(o[tail])
    o.backward(grad)
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))

    leaves = [x[tail].detach().float().requires_grad_() for x in (q, k, v)]
    o_ref = sparse_attn_ref(*leaves, lut[tail], block_q, block_k, scale) + linear_attn_ref(*leaves, "softmax", w, b)
    (o_ref * grad[tail].float()).sum().backward()
    assert_close("out, last head", o_ref.detach(), o[tail].detach().float(), TOL_PIPELINE_SLA)
    for name, x, leaf in zip(("dq", "dk", "dv"), (q, k, v), leaves, strict=True):
        assert_close(f"{name}, last head", leaf.grad, x.grad[tail].float(), TOL_GRAD_BF16)
