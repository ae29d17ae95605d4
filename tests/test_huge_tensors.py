"""Huge tensors (GPU only): B*H*L*D > 2^31 elements, where a 32-bit pointer offset would wrap.

Every kernel adds a 64-bit per-head base (``head_base``, ``i_bh.to(tl.int64)``) to 32-bit offsets inside the head,
which stay below (2048 key blocks x 256 rows) x 256 padded channels = 2^27 (the selection kernel's limit). These
tests run such a shape through the Triton path and compare the last batch's last heads, the farthest from the base
pointer, with the torch reference computed on that slice alone; the NaN-poisoned output must be written everywhere.
"""

import pytest
import torch

from sagesla.functional import resolve_block_sizes
from sagesla.testing import TOL_KERNEL_FP8, TOL_PIPELINE_HALF, assert_close, run_forward

# Wan2.1-14B 720p (H40 L75600 D128) at batch 6: 2.32e9 elements per tensor.
SHAPE = (6, 40, 75600, 128)
# q, k, v and the output in bf16, INT8 Q and K, FP8 V (2.3 GB each) and the block scores: ~26 GB; the slice's
# reference gathers ~5 GB more.
NEEDS_BYTES = 40 * 2**30
SLICE_HEADS = 2


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("pv", ["fp8", "half"])
def test_huge_tensor_slice_matches_reference(layout, pv):
    batch, heads, length, head_dim = SHAPE
    assert batch * heads * length * head_dim > 2**31
    free = torch.cuda.mem_get_info()[0]
    if free < NEEDS_BYTES:
        pytest.skip(f"needs {NEEDS_BYTES / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = SHAPE if layout == "HND" else (batch, length, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w = torch.randn(head_dim, head_dim, generator=gen, device="cuda") * 0.02
    b = torch.randn(head_dim, generator=gen, device="cuda") * 0.02
    block_q, block_k = resolve_block_sizes(True, q.device)
    options = {"topk": 0.05, "pv_precision": pv, "block_q": block_q, "block_k": block_k, "proj_weight": w}
    o, lut = run_forward("triton", q, k, v, tensor_layout=layout, proj_bias=b, **options)
    assert torch.isfinite(o).all(), "output rows left unwritten (NaN poison) or non-finite"

    hnd = [x if layout == "HND" else x.transpose(1, 2) for x in (q, k, v, o)]
    tail = (slice(batch - 1, batch), slice(heads - SLICE_HEADS, heads))
    o_ref, lut_ref = run_forward("torch", *(x[tail].contiguous() for x in hnd[:3]), proj_bias=b, **options)
    # Pools summed in another order may swap two near-equal blocks; compare the query blocks that agree.
    agree = (lut[tail] == lut_ref).all(dim=-1)
    assert agree.float().mean() >= 0.99
    rows = agree.repeat_interleave(block_q, dim=-1)[..., :length]
    tol = TOL_KERNEL_FP8 if pv == "fp8" else TOL_PIPELINE_HALF
    assert_close(f"last heads of B{batch} H{heads} L{length} [{layout}, {pv}]", o_ref[rows], hnd[3][tail][rows], tol)
