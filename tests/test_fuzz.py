"""Property tests over the input space: B, H, L (1 to 1100, odd and prime included), D (64, 128 and padded ones),
fp16 / bf16, both layouts, topk, block sizes, feature maps, quantized or not, P.V precision, linear branch or not.

- The torch reference against the float64 SLA with the same block selection, within the documented bounds
  (``sagesla.testing.BOUND_*``), and the public API equal, bit for bit, to the pipeline it dispatches to.
- Every Triton kernel (under the interpreter without a GPU) against its reference on a smaller sample of the space.
- The trainable Triton path with scope "complement" where few key blocks are left out (topk 0.75 to 1, or every
  block but the last, often a short tail), forward and gradients against float64 autograd of the references.

Examples are drawn the same way on every run (conftest's "ci" hypothesis profile); SAGESLA_FUZZ_SCALE=N draws N
times as many.
"""

import dataclasses
import os
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st

import sagesla
from sagesla.kernels.block_select import select_blocks
from sagesla.kernels.block_select_ref import lut_to_mask, select_blocks_ref
from sagesla.kernels.constants import LOG2E
from sagesla.kernels.kv_stats import kv_stats
from sagesla.kernels.kv_stats_ref import kv_stats_ref
from sagesla.kernels.linear_attn_ref import linear_attn_ref
from sagesla.kernels.quant import quant_qk, quant_v_fp8
from sagesla.kernels.quant_ref import pool_blocks_ref, quant_qk_ref, quant_v_fp8_ref
from sagesla.kernels.sla_train import sparse_linear_train
from sagesla.kernels.sparse_attn_ref import sparse_attn_ref
from sagesla.testing import (
    BOUND_SAGESLA,
    BOUND_SLA,
    TOL_KERNEL_FP8,
    TOL_KV_STATE,
    TOL_PIPELINE_HALF,
    TOL_PIPELINE_SLA,
    assert_close,
    run_forward,
    sla_dense_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = int(os.environ.get("SAGESLA_FUZZ_SCALE", "1"))
# Lengths around block edges and primes, besides uniform draws.
EDGE_LENGTHS = [1, 2, 63, 64, 65, 127, 131, 509, 521, 1021, 1031, 1097]


@dataclass(frozen=True)
class Case:
    """One drawn call; hypothesis prints it when a property fails."""

    batch: int
    heads: int
    length: int
    head_dim: int
    dtype: torch.dtype
    layout: str
    topk: float
    blocks: tuple[int, int]
    feature_map: str
    quantized: bool
    pv_precision: str
    linear: bool
    sharpness: float
    seed: int

    def inputs(self) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """([q, k, v] in the layout and dtype, proj_l weight, bias); K has a shared offset, as real keys do."""
        gen = torch.Generator().manual_seed(self.seed)
        shape = (self.batch, self.heads, self.length, self.head_dim)
        q = torch.randn(shape, generator=gen) * self.sharpness
        k = torch.randn(shape, generator=gen) + 0.5 * torch.randn(*shape[:2], 1, shape[3], generator=gen)
        v = torch.randn(shape, generator=gen)
        qkv = [x.to(DEVICE, self.dtype) for x in (q, k, v)]
        if self.layout == "NHD":
            qkv = [x.transpose(1, 2).contiguous() for x in qkv]
        if not self.linear:
            return qkv, None, None
        d = self.head_dim
        w, b = torch.randn(d, d, generator=gen) * 0.1, torch.randn(d, generator=gen) * 0.1
        return qkv, w.to(DEVICE), b.to(DEVICE)

    def hnd(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.layout == "HND" else x.transpose(1, 2)

    def options(self) -> dict:
        """Keyword arguments shared by ``run_forward`` and ``sparse_linear_attn``."""
        return {
            "topk": self.topk,
            "tensor_layout": self.layout,
            "quantized": self.quantized,
            "pv_precision": self.pv_precision,
            "block_q": self.blocks[0],
            "block_k": self.blocks[1],
            "feature_map": self.feature_map,
        }


@st.composite
def cases(draw, max_length: int, max_heads: int, quantized, blocks) -> Case:
    batch = draw(st.integers(1, 2))
    length = draw(st.one_of(st.integers(1, max_length), st.sampled_from([n for n in EDGE_LENGTHS if n <= max_length])))
    return Case(
        batch=batch,
        heads=draw(st.integers(1, max_heads // batch)),
        length=length,
        head_dim=draw(st.sampled_from([64, 128, 48, 80, 96])),
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])),
        layout=draw(st.sampled_from(["HND", "NHD"])),
        topk=draw(st.sampled_from([0.01, 0.05, 0.2, 0.5, 1.0]) | st.floats(0.01, 1.0)),
        blocks=draw(blocks),
        feature_map=draw(st.sampled_from(["softmax", "elu", "relu"])),
        quantized=draw(quantized),
        pv_precision=draw(st.sampled_from(["fp8", "half"])),
        linear=draw(st.booleans()),
        sharpness=draw(st.sampled_from([0.5, 1.0, 2.0])),
        seed=draw(st.integers(0, 2**16)),
    )


REFERENCE_CASES = cases(1100, 4, st.booleans(), st.sampled_from([(64, 64), (128, 64), (64, 128), (32, 32), (16, 48)]))
# The Triton backend serves power-of-two blocks; the interpreter runs ~3.5 ms per block step.
TRITON_CASES = cases(512, 2, st.booleans(), st.sampled_from([(64, 64), (128, 64), (64, 128), (32, 64)]))


@settings(max_examples=80 * SCALE)
@given(case=REFERENCE_CASES)
def test_reference_vs_float64(case):
    qkv, w, b = case.inputs()
    o, lut = run_forward("torch", *qkv, proj_weight=w, proj_bias=b, **case.options())
    api = sagesla.sparse_linear_attn(*qkv, proj_weight=w, proj_bias=b, backend="torch", **case.options())
    assert api.dtype == case.dtype and api.shape == qkv[0].shape and torch.equal(api, o)
    hnd = [case.hnd(x) for x in qkv]
    truth = sla_dense_reference(*hnd, lut, *case.blocks, w, b, case.feature_map, dtype=torch.float64)
    assert_close(repr(case), truth, case.hnd(o), BOUND_SAGESLA if case.quantized else BOUND_SLA)


@settings(max_examples=30 * SCALE)
@given(case=TRITON_CASES)
def test_triton_stages_vs_reference(case):
    """kv_stats, quant_qk (bit for bit), select_blocks (equal) and quant_v_fp8 (equal) on the same inputs."""
    qkv, *_ = case.inputs()
    q, k, v = (case.hnd(x) for x in qkv)
    (bq, bk), (L, D) = case.blocks, (case.length, case.head_dim)
    feature = case.feature_map if case.linear else None
    ref, tri = kv_stats_ref(k, v, True, feature), kv_stats(k, v, True, feature)
    for name, r, t in zip(ref._fields, ref, tri, strict=True):
        if r is not None:
            assert_close(f"kv_stats.{name} {case!r}", r, t, TOL_KV_STATE if name in ("kv", "ksum") else 1e-5)
    mult = D**-0.5 * LOG2E
    qk_ref, qk_tri = quant_qk_ref(q, k, bq, bk, mult, ref.k_mean), quant_qk(q, k, bq, bk, mult, ref.k_mean)
    assert torch.equal(qk_tri.q_scale, qk_ref.q_scale) and torch.equal(qk_tri.k_scale, qk_ref.k_scale)
    assert torch.equal(qk_tri.q_int8[..., :L, :D], qk_ref.q_int8)
    assert torch.equal(qk_tri.k_int8[..., :L, :D], qk_ref.k_int8)
    lut = select_blocks_ref(qk_ref.q_pool, qk_ref.k_pool, case.topk)
    assert torch.equal(select_blocks(qk_ref.q_pool, qk_ref.k_pool, case.topk), lut)
    v_ref = quant_v_fp8_ref(v, ref.v_amax)[0]
    v_tri = quant_v_fp8(v, ref.v_amax, qk_tri.k_int8.shape[2])[0]
    assert torch.equal(v_tri[..., :D, :L].transpose(-1, -2).float(), v_ref.float())


@settings(max_examples=16 * SCALE)
@given(case=TRITON_CASES)
def test_triton_pipeline_vs_reference(case):
    """The Triton forward against the torch one (same selection) and against float64 (documented bound)."""
    qkv, w, b = case.inputs()
    o_tri, lut_tri = run_forward("triton", *qkv, proj_weight=w, proj_bias=b, **case.options())
    o_ref, lut_ref = run_forward("torch", *qkv, proj_weight=w, proj_bias=b, **case.options())
    # Pools summed in another order may swap two near-equal blocks; compare the query blocks that agree.
    agree = (lut_tri == lut_ref).all(dim=-1)
    assert agree.float().mean() >= 0.9, f"selection differs in {int((~agree).sum())} query blocks"
    rows = agree.repeat_interleave(case.blocks[0], dim=-1)[..., : case.length]
    if not case.quantized:
        tol = TOL_PIPELINE_SLA
    else:
        tol = TOL_KERNEL_FP8 if case.pv_precision == "fp8" else TOL_PIPELINE_HALF
    assert_close(f"triton vs torch {case!r}", case.hnd(o_ref)[rows], case.hnd(o_tri)[rows], tol)
    hnd = [case.hnd(x) for x in qkv]
    truth = sla_dense_reference(*hnd, lut_tri, *case.blocks, w, b, case.feature_map, dtype=torch.float64)
    assert_close(f"triton vs float64 {case!r}", truth, case.hnd(o_tri), BOUND_SAGESLA if case.quantized else BOUND_SLA)


@st.composite
def few_left_out_cases(draw) -> tuple[Case, bool]:
    """(an unquantized case with the linear branch and topk in [0.75, 1], whether to select every key block but the
    last instead of the top-k)."""
    # one token has dq = dk = 0 exactly, where a relative error means nothing
    blocks = st.sampled_from([(64, 64), (32, 64), (64, 32)])
    case = draw(cases(1100, 2, st.just(False), blocks).filter(lambda c: c.length > 1))
    return dataclasses.replace(case, topk=draw(st.floats(0.75, 1.0)), linear=True), draw(st.booleans())


def _sla_grads(q, k, v, w, b, grad, lut, case: Case, train: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SLA of scope "complement" with selection ``lut``: (out, grads of q, k, v, w, b), by the Triton training
    kernels (``train``) or by float64 autograd of the references."""
    bq, bk = case.blocks
    if train:
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, w, b)]
        stats = kv_stats(k, v, False, case.feature_map)
        o = sparse_linear_train(
            *leaves[:3],
            lut,
            stats.kv,
            stats.ksum,
            block_q=bq,
            block_k=bk,
            sm_scale=case.head_dim**-0.5,
            feature_map=case.feature_map,
            linear_scope="complement",
            proj_weight=leaves[3],
            proj_bias=leaves[4],
        )
    else:
        leaves = [x.double().requires_grad_() for x in (q, k, v, w, b)]
        mask = lut_to_mask(lut, -(-case.length // bk))
        o = sparse_attn_ref(*leaves[:3], lut, bq, bk, case.head_dim**-0.5) + linear_attn_ref(
            *leaves[:3], case.feature_map, *leaves[3:], scope="complement", block_mask=mask, block_q=bq, block_k=bk
        )
    (o * grad.to(o.dtype)).sum().backward()
    return o.detach(), [x.grad for x in leaves]


@settings(max_examples=8 * SCALE)
@given(drawn=few_left_out_cases())
def test_triton_train_complement_few_left_out_vs_float64(drawn):
    """Scope "complement" keeps the few unselected blocks' share accurate (BOUND_SLA, forward and gradients)."""
    case, all_but_last = drawn
    qkv, w, b = case.inputs()
    q, k, v = (case.hnd(x) for x in qkv)
    (bq, bk), length = case.blocks, case.length
    nq, nk = -(-length // bq), -(-length // bk)
    if all_but_last and nk > 1:
        lut = torch.arange(nk - 1, dtype=torch.int32, device=DEVICE).expand(*q.shape[:2], nq, nk - 1)
    else:
        k_smooth = k.float() - k.float().mean(dim=-2, keepdim=True)
        lut = select_blocks_ref(pool_blocks_ref(q, bq), pool_blocks_ref(k_smooth, bk), case.topk)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(case.seed)).to(DEVICE)
    o_ref, g_ref = _sla_grads(q, k, v, w, b, grad, lut, case, train=False)
    o_tri, g_tri = _sla_grads(q, k, v, w, b, grad, lut, case, train=True)
    name = f"{case!r} all_but_last={all_but_last}"
    assert_close(f"out {name}", o_ref, o_tri.double(), BOUND_SLA)
    for label, r, t in zip(("dq", "dk", "dv", "dW", "db"), g_ref, g_tri, strict=True):
        assert_close(f"{label} {name}", r, t.double(), BOUND_SLA)
