"""The reference quantizers against the recipe, computed independently in float64."""

import math

import pytest
import torch

from sagesla.kernels.constants import FP8_DTYPE
from sagesla.kernels.kv_stats_ref import kv_stats_ref
from sagesla.kernels.quant_ref import (
    pool_blocks_ref,
    quant_int8_per_block_ref,
    quant_qk_ref,
    quant_v_fp8_ref,
    round_half_away,
)


def test_round_half_away_from_zero():
    x = torch.tensor([-2.5, -1.5, -0.5, -0.49, 0.0, 0.49, 0.5, 1.5, 2.5, 126.5])
    assert round_half_away(x).tolist() == [-3, -2, -1, 0, 0, 0, 1, 2, 3, 127]


@pytest.mark.parametrize("length,block", [(77, 32), (128, 64), (1000, 128), (5, 64)], ids=lambda v: str(v))
def test_int8_per_block_matches_float64_recipe(length, block):
    x = torch.randn(2, 3, length, 64) * torch.rand(2, 3, length, 1) * 4
    x[0, 0, :3] = 0.0  # a partly zero block
    x_int8, scale = quant_int8_per_block_ref(x, block)
    assert x_int8.dtype == torch.int8 and scale.shape == (2, 3, math.ceil(length / block))
    xd = x.double()
    for i in range(scale.shape[-1]):
        tile = xd[:, :, i * block : (i + 1) * block]
        want_scale = tile.abs().amax(dim=(-2, -1)) / 127
        torch.testing.assert_close(scale[..., i].double(), want_scale, rtol=1e-6, atol=0)
        want = torch.sign(tile) * torch.floor(tile.abs() / want_scale[..., None, None] + 0.5)
        # Ties sit exactly on x.5 only by accident of rounding: allow 1 step at most, and on a tiny share.
        diff = (x_int8[:, :, i * block : (i + 1) * block].double() - want).abs()
        assert diff.max() <= 1 and diff.mean() < 1e-3
    # Dequantized error within half a step of each block's scale.
    blocks = scale.repeat_interleave(block, dim=-1)[..., :length, None]
    assert ((x_int8.float() * blocks - x).abs() <= blocks * 0.5 + 1e-6).all()


def test_int8_all_zero_block_is_exact():
    x = torch.zeros(1, 1, 100, 64)
    x[..., 64:, :] = torch.randn(36, 64)
    x_int8, scale = quant_int8_per_block_ref(x, 64)
    assert (x_int8[..., :64, :] == 0).all() and torch.isfinite(scale).all() and scale[0, 0, 0] > 0


def test_pool_uses_real_rows_of_tail_block():
    x = torch.randn(1, 2, 70, 8, dtype=torch.float64)
    pooled = pool_blocks_ref(x, 64)
    torch.testing.assert_close(pooled[..., 1, :].double(), x[..., 64:, :].mean(dim=-2), rtol=1e-6, atol=1e-6)


def test_quant_qk_smooths_k_and_folds_q_mult():
    q = torch.randn(1, 2, 77, 64)
    k = torch.randn(1, 2, 77, 64) + 5.0  # a large shared offset
    out = quant_qk_ref(q, k, 32, 64, 0.3, kv_stats_ref(k, k, False, None).k_mean)
    torch.testing.assert_close(out.k_mean, k.mean(dim=-2, keepdim=True))
    kd = k.double() - k.double().mean(dim=-2, keepdim=True)
    k_deq = out.k_int8.double() * out.k_scale.double().repeat_interleave(64, -1)[..., :77, None]
    assert (k_deq - kd).abs().max() <= out.k_scale.max() * 0.5 + 1e-6
    q_deq = out.q_int8.double() * out.q_scale.double().repeat_interleave(32, -1)[..., :77, None]
    assert (q_deq - 0.3 * q.double()).abs().max() <= out.q_scale.max() * 0.5 + 1e-6
    torch.testing.assert_close(out.q_pool, pool_blocks_ref(q, 32))
    torch.testing.assert_close(out.k_pool.double(), pool_blocks_ref(kd, 64).double(), rtol=1e-5, atol=1e-5)


def test_v_fp8_per_channel_scale_and_error():
    v = torch.randn(2, 2, 300, 64)
    v[..., 7] *= 1e4  # one outlier channel must not hurt the others
    v_fp8, scale = quant_v_fp8_ref(v, kv_stats_ref(v, v, True, None).v_amax)
    assert v_fp8.dtype == FP8_DTYPE and scale.shape == (2, 2, 64)
    torch.testing.assert_close(scale, v.abs().amax(dim=-2) / 448)
    deq = v_fp8.float() * scale[..., None, :]
    assert torch.isfinite(deq).all()
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values.
    big = v.abs() >= scale[..., None, :] * 2**-6  # normal e4m3 range
    assert ((deq - v).abs()[big] <= v.abs()[big] * 2**-4 + 1e-6).all()
    assert deq.abs().max() <= v.abs().max()
