"""Reference quantizers of the SageSLA recipe (see ``docs/math.md``).

- Q and smoothed K: symmetric INT8, one fp32 scale per block of BQ (BK) rows: ``scale = max(amax, FLOOR) * (1/127)``,
  ``value = round_half_away_from_zero(x * (1 / scale))`` clamped to [-127, 127]. A short tail block uses its real rows.
- V: FP8 e4m3, one fp32 scale per (batch, head, channel) over all tokens: ``scale = max(amax, FLOOR) * (1/448)``.
  Every step is one IEEE fp32 operation (multiply by fp32 constants, exact reciprocal), so the GPU kernels and this
  reference agree bit for bit on any device.
- P: FP8 e4m3 after shifting its maximum to 448 (done inside the attention, see ``sparse_attn_ref``).
"""

from typing import NamedTuple

import torch

from sagesla.kernels.blocks_ref import block_rows, to_blocks
from sagesla.kernels.constants import FP8_DTYPE, FP8_MAX, INT8_MAX, SCALE_FLOOR


class QKQuant(NamedTuple):
    """Quantized Q and smoothed K with the pooled blocks used for selection.

    q_int8: [B, H, L, D] int8, of ``q * q_mult``.      q_scale: [B, H, NQ] fp32, one per BQ x D tile.
    q_pool: [B, H, NQ, D] fp32 mean of each Q block's real rows (before ``q_mult``).
    k_int8: [B, H, L, D] int8, of ``k - k_mean``.       k_scale: [B, H, NK] fp32, one per BK x D tile.
    k_pool: [B, H, NK, D] fp32 mean of each smoothed K block's real rows.
    k_mean: [B, H, 1, D] fp32 token mean of K.
    """

    q_int8: torch.Tensor
    q_scale: torch.Tensor
    q_pool: torch.Tensor
    k_int8: torch.Tensor
    k_scale: torch.Tensor
    k_pool: torch.Tensor
    k_mean: torch.Tensor


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties away from zero (the kernels' rule)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def quant_int8_per_block_ref(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 with one scale per block of rows.

    Args:
        x: [B, H, L, D] fp32.
        block: rows per block.
    Returns:
        x_int8 [B, H, L, D] int8 and scale [B, H, N] fp32 (N = ceil(L / block)).
    """
    length = x.shape[-2]
    tiles = to_blocks(x, block)
    scale = tiles.abs().amax(dim=(-2, -1)).clamp(min=SCALE_FLOOR) * (1.0 / INT8_MAX)
    values = round_half_away(tiles * torch.reciprocal(scale)[..., None, None]).clamp(-INT8_MAX, INT8_MAX)
    return values.flatten(-3, -2)[..., :length, :].to(torch.int8), scale


def pool_blocks_ref(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block's real rows: [B, H, L, D] -> [B, H, N, D] fp32."""
    sums = to_blocks(x.float(), block).sum(dim=-2)
    return sums / block_rows(x.shape[-2], block, x.device)[:, None]


def quant_qk_ref(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, q_mult: float, k_mean: torch.Tensor
) -> QKQuant:
    """Smooth K, quantize Q (times ``q_mult``) and smoothed K per block, and pool both for selection.

    Args:
        q, k: [B, H, L, D] fp16 / bf16 / fp32.
        block_q, block_k: rows per Q / K block.
        q_mult: folded into Q before quantizing (``sm_scale * log2(e)`` so scores come out in base 2).
        k_mean: [B, H, 1, D] fp32 token mean of K (``kv_stats_ref``).
    """
    qf = q.float()
    ks = k.float() - k_mean
    q_int8, q_scale = quant_int8_per_block_ref(qf * q_mult, block_q)
    k_int8, k_scale = quant_int8_per_block_ref(ks, block_k)
    return QKQuant(q_int8, q_scale, pool_blocks_ref(qf, block_q), k_int8, k_scale, pool_blocks_ref(ks, block_k), k_mean)


def fp8_v_scale(v_amax: torch.Tensor) -> torch.Tensor:
    """Per-channel FP8 V scales from the channel maxima [B, H, D]: ``max(amax, SCALE_FLOOR) / FP8_MAX``."""
    return v_amax.clamp(min=SCALE_FLOOR) * (1.0 / FP8_MAX)


def quant_v_fp8_ref(v: torch.Tensor, v_amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 V with one scale per channel over all tokens.

    Args:
        v: [B, H, L, D].
        v_amax: [B, H, D] fp32 per-channel max of |v| (``kv_stats_ref``).
    Returns:
        v_fp8 [B, H, L, D] float8_e4m3fn and v_scale [B, H, D] fp32 (``v ~= v_fp8 * v_scale``).
    """
    scale = fp8_v_scale(v_amax)
    return (v.float() * torch.reciprocal(scale)[..., None, :]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
