"""Reference block-sparse attention against float64 dense attention masked to the same blocks."""

import pytest
import torch

from sagesla.kernels.block_select_ref import lut_to_mask, select_blocks_ref
from sagesla.kernels.constants import LOG2E
from sagesla.kernels.quant_ref import pool_blocks_ref, quant_qk_ref, quant_v_fp8_ref
from sagesla.kernels.sparse_attn_ref import sparse_attn_quant_ref, sparse_attn_ref
from sagesla.testing import assert_close, dense_masked_attention, expand_block_mask

# fp32 math on fp32 inputs.
TOL_FP32 = 1e-5
# INT8 Q/K with FP8 P/V (the reference SageSLA measured 0.0375 at L=8192 against fp32).
TOL_FP8_PV = 5e-2
# INT8 Q/K with 16-bit P/V.
TOL_HALF_PV = 1.5e-2


def _case(length, head_dim, topk, bq, bk, heads=2):
    q = torch.randn(1, heads, length, head_dim)
    k = torch.randn(1, heads, length, head_dim) + 0.5 * torch.randn(1, heads, 1, head_dim)
    v = torch.randn(1, heads, length, head_dim)
    lut = select_blocks_ref(pool_blocks_ref(q, bq), pool_blocks_ref(k, bk), topk)
    mask = expand_block_mask(lut_to_mask(lut, -(-length // bk)), length, bq, bk)
    return q, k, v, lut, mask


CASES = [
    pytest.param(77, 64, 0.5, 32, 64, id="L77-D64-topk0.5-32x64"),
    pytest.param(1000, 128, 0.1, 64, 128, id="L1000-D128-topk0.1-64x128"),
    pytest.param(1000, 64, 1.0, 128, 64, id="L1000-D64-topk1-128x64"),
    pytest.param(300, 80, 0.01, 64, 64, id="L300-D80-topk-one-block"),
    pytest.param(40, 64, 0.5, 64, 64, id="L40-shorter-than-a-block"),
]


@pytest.mark.parametrize("length,head_dim,topk,bq,bk", CASES)
def test_unquantized_matches_float64(length, head_dim, topk, bq, bk):
    q, k, v, lut, mask = _case(length, head_dim, topk, bq, bk)
    ref = dense_masked_attention(q, k, v, mask)
    tri = sparse_attn_ref(q, k, v, lut, bq, bk, head_dim**-0.5)
    assert_close("sparse_attn_ref", ref, tri, TOL_FP32)


@pytest.mark.parametrize("length,head_dim,topk,bq,bk", CASES)
@pytest.mark.parametrize("pv", ["fp8", "half"])
def test_quantized_matches_float64(length, head_dim, topk, bq, bk, pv):
    q, k, v, lut, mask = _case(length, head_dim, topk, bq, bk)
    ref = dense_masked_attention(q, k, v, mask)
    qk = quant_qk_ref(q, k, bq, bk, head_dim**-0.5 * LOG2E, k.mean(dim=-2, keepdim=True))
    v_q, v_scale = quant_v_fp8_ref(v, v.abs().amax(dim=-2)) if pv == "fp8" else (v.to(torch.bfloat16), None)
    tri = sparse_attn_quant_ref(qk.q_int8, qk.q_scale, qk.k_int8, qk.k_scale, v_q, v_scale, lut, bq, bk)
    assert_close(f"sparse_attn_quant_ref[{pv}]", ref, tri, TOL_FP8_PV if pv == "fp8" else TOL_HALF_PV)


def test_outlier_channel_in_v_stays_accurate():
    q, k, v, lut, mask = _case(256, 64, 0.5, 64, 64)
    v[..., 3] *= 1e4
    ref = dense_masked_attention(q, k, v, mask)
    qk = quant_qk_ref(q, k, 64, 64, 64**-0.5 * LOG2E, k.mean(dim=-2, keepdim=True))
    v_fp8, v_scale = quant_v_fp8_ref(v, v.abs().amax(dim=-2))
    tri = sparse_attn_quant_ref(qk.q_int8, qk.q_scale, qk.k_int8, qk.k_scale, v_fp8, v_scale, lut, 64, 64)
    keep = torch.ones(64, dtype=torch.bool)
    keep[3] = False
    assert_close("other channels", ref[..., keep], tri[..., keep], TOL_FP8_PV)
    assert_close("outlier channel", ref[..., 3], tri[..., 3], TOL_FP8_PV)


def test_many_heads_walk_in_chunks(monkeypatch):
    from sagesla.kernels import sparse_attn_ref as module

    q, k, v, lut, mask = _case(200, 64, 0.5, 64, 64, heads=5)
    whole = sparse_attn_ref(q, k, v, lut, 64, 64, 0.125)
    monkeypatch.setattr(module, "_CHUNK_BYTES", 1)  # one head per chunk
    torch.testing.assert_close(sparse_attn_ref(q, k, v, lut, 64, 64, 0.125), whole)
