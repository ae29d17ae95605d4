"""Triton quantizers of SageSLA: per-block INT8 Q and smoothed K (with the pooled blocks) and per-channel FP8 V.

Twin of ``quant_ref.py`` (``quant_qk`` ~ ``quant_qk_ref``, ``quant_v_fp8`` ~ ``quant_v_fp8_ref``). Quantized
tensors are internal buffers laid out for the attention kernel: rows padded to whole blocks and the head dim
padded to DP, both with zeros; V in FP8 is stored transposed ([D, L], keys contiguous), the K-major operand
layout that FP8 matrix instructions need.
"""

import torch
import triton
import triton.language as tl

from sagesla.kernels._triton_utils import (
    FP8_MAX,
    INT8_MAX,
    IS_INTERPRET,
    SCALE_FLOOR,
    fp8e4m3_round_interpret,
    head_base,
    load_rows,
    padded_head_dim,
    tile_ptrs,
)
from sagesla.kernels.constants import FP8_DTYPE
from sagesla.kernels.quant_ref import QKQuant, fp8_v_scale


@triton.jit
def _round_half_away(x):
    return tl.where(x >= 0, tl.floor(x + 0.5), -tl.floor(0.5 - x))


@triton.jit
def _smoothed_rows(base, o_t, s_xl, o_d, L, D: tl.constexpr, mean, HAS_MEAN: tl.constexpr):
    """Rows ``o_t`` of one head as fp32 [len(o_t), DP], minus ``mean`` [DP] (0 past D) when HAS_MEAN; 0 past L and D."""
    x = load_rows(base, o_t, s_xl, o_d, L, D, False).to(tl.float32)
    if HAS_MEAN:
        x = tl.where((o_t < L)[:, None], x - mean[None, :], 0.0)
    return x


@triton.jit
def quant_block_kernel(
    x,
    s_xb,
    s_xh,
    s_xl,
    mean,
    x_int8,
    x_scale,
    x_pool,
    mult,
    L,
    H,
    N,
    D: tl.constexpr,
    DP: tl.constexpr,
    BLK: tl.constexpr,
    RC: tl.constexpr,
    HAS_MEAN: tl.constexpr,
):
    """One block of BLK rows: subtract the token mean (K), pool, scale by ``mult``, INT8 with one scale.

    Two sweeps over the block in chunks of RC rows, the second reading it again (from L1/L2): the sums and the
    maximum, then the quantization, so no whole tile sits in registers (RC 32: fastest at the Wan shapes,
    benchmarks/experiments.md, INT8 quantizer).
    """
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    base = head_base(x, i_bh, H, s_xb, s_xh)
    if HAS_MEAN:
        b_mean = tl.load(mean + i_bh.to(tl.int64) * D + o_d, mask=m_d, other=0.0)
    else:
        b_mean = tl.zeros([DP], dtype=tl.float32)
    # [RC, DP] elementwise sums and maxima over the block's row chunks
    a_sum = tl.zeros([RC, DP], dtype=tl.float32)
    a_max = tl.zeros([RC, DP], dtype=tl.float32)
    for r in tl.static_range(0, BLK, RC):
        b_x = _smoothed_rows(base, i_n * BLK + r + tl.arange(0, RC), s_xl, o_d, L, D, b_mean, HAS_MEAN)
        a_sum += b_x
        a_max = tl.maximum(a_max, tl.abs(b_x * mult))
    rows = tl.minimum(L - i_n * BLK, BLK).to(tl.float32)
    b_sum = tl.sum(a_sum, axis=0)
    tl.store(x_pool + (i_bh.to(tl.int64) * N + i_n) * DP + o_d, b_sum / rows)
    scale = tl.maximum(tl.max(a_max), SCALE_FLOOR) * (1.0 / INT8_MAX)
    # Max reductions skip NaN (on the GPU and in the interpreter): a NaN in the block, seen through its sum, makes
    # the scale NaN, so every score of the block is NaN as the reference's (and dense attention's) would be.
    b_total = tl.sum(b_sum)
    scale = tl.where(b_total == b_total, scale, float("nan"))
    tl.store(x_scale + i_bh.to(tl.int64) * N + i_n, scale)
    # One IEEE reciprocal (Triton's `/` on fp32 is approximate) and a multiply, as the reference.
    inv = tl.math.div_rn(1.0, scale)
    for r in tl.static_range(0, BLK, RC):
        o_t = i_n * BLK + r + tl.arange(0, RC)
        b_x = _smoothed_rows(base, o_t, s_xl, o_d, L, D, b_mean, HAS_MEAN)
        b_q = tl.minimum(tl.maximum(_round_half_away(b_x * mult * inv), -INT8_MAX), INT8_MAX)
        p_q = x_int8 + (i_bh.to(tl.int64) * N * BLK + o_t[:, None]) * DP + o_d[None, :]
        tl.store(p_q, b_q.to(tl.int8))


@triton.jit
def quant_v_fp8_kernel(
    v,
    s_vb,
    s_vh,
    s_vl,
    v_scale,
    v_fp8t,
    L,
    H,
    LP,
    D: tl.constexpr,
    DP: tl.constexpr,
    BT: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    """V / v_scale to FP8 e4m3, written transposed: v_fp8t [B*H, DP, LP]."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = tl.arange(0, DP)
    m_x = (o_t < L)[:, None] & (o_d < D)[None, :]
    p_v = tile_ptrs(head_base(v, i_bh, H, s_vb, s_vh), o_t, s_vl, o_d)
    # [BT, DP]
    b_v = tl.load(p_v, mask=m_x, other=0.0).to(tl.float32)
    p_scale = v_scale + i_bh.to(tl.int64) * D + o_d
    b_inv = tl.math.div_rn(1.0, tl.load(p_scale, mask=o_d < D, other=1.0))
    # kv_stats' max skips NaN (max reductions do): a channel holding one gets a NaN scale here, so the output
    # channel is NaN as dense attention's. Every program writes the same NaN, so the result is order-independent.
    tl.store(p_scale, float("nan"), mask=tl.max((b_v != b_v).to(tl.int32), axis=0) > 0)
    b_v = tl.minimum(tl.maximum(b_v * b_inv[None, :], -FP8_MAX), FP8_MAX)
    if IS_INTERPRET:
        b_v = fp8e4m3_round_interpret(b_v)
    p_out = v_fp8t + i_bh.to(tl.int64) * DP * LP + o_d[None, :].to(tl.int64) * LP + o_t[:, None]
    tl.store(p_out, b_v.to(v_fp8t.dtype.element_ty), mask=(o_t < LP)[:, None])


def _quant_blocks(x: torch.Tensor, block: int, mult: float, mean: torch.Tensor | None):
    B, H, L, D = x.shape
    DP, N = padded_head_dim(D), triton.cdiv(L, block)
    x_int8 = torch.empty(B, H, N * block, DP, device=x.device, dtype=torch.int8)
    scale = torch.empty(B, H, N, device=x.device, dtype=torch.float32)
    pool = torch.empty(B, H, N, DP, device=x.device, dtype=torch.float32)
    quant_block_kernel[(N, B * H)](
        x,
        *x.stride()[:3],
        scale if mean is None else mean.contiguous(),
        x_int8,
        scale,
        pool,
        mult,
        L,
        H,
        N,
        D=D,
        DP=DP,
        BLK=block,
        RC=min(block, 32),
        HAS_MEAN=mean is not None,
    )
    return x_int8, scale, pool


def quant_qk(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, q_mult: float, k_mean: torch.Tensor
) -> QKQuant:
    """Triton twin of ``quant_qk_ref``.

    Args:
        q, k: [B, H, L, D] views with unit stride on D.
        k_mean: [B, H, 1, D] fp32 token mean of K (``kv_stats``).
    Returns:
        QKQuant with q_int8 [B, H, NQ*BQ, DP] and k_int8 [B, H, NK*BK, DP] (zero-padded rows and columns), pools
        [B, H, N, DP] (zero in padded columns); scales and k_mean as the reference.
    """
    q_int8, q_scale, q_pool = _quant_blocks(q, block_q, q_mult, None)
    k_int8, k_scale, k_pool = _quant_blocks(k, block_k, 1.0, k_mean)
    return QKQuant(q_int8, q_scale, q_pool, k_int8, k_scale, k_pool, k_mean)


def quant_v_fp8(v: torch.Tensor, v_amax: torch.Tensor, padded_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``quant_v_fp8_ref``, written transposed for the FP8 P.V product.

    Args:
        v: [B, H, L, D] view with unit stride on D.
        v_amax: [B, H, D] fp32 (``kv_stats``).
        padded_length: rows of V to write, a whole number of key blocks (>= L); rows past L are zero.
    Returns:
        v_fp8t [B, H, DP, padded_length] float8_e4m3fn and v_scale [B, H, D] fp32.
    """
    scale = fp8_v_scale(v_amax)
    return quant_v_fp8_scaled(v, scale, padded_length), scale


def quant_v_fp8_scaled(v: torch.Tensor, v_scale: torch.Tensor, padded_length: int) -> torch.Tensor:
    """``quant_v_fp8`` with its scales given (``inference_stats``): v_fp8t [B, H, DP, padded_length].

    A channel holding NaN gets a NaN scale (written into ``v_scale`` [B, H, D], contiguous fp32).
    """
    B, H, L, D = v.shape
    DP = padded_head_dim(D)
    # 128-token tiles: fastest at the Wan shapes (benchmarks/experiments.md, FP8 V).
    BT = 128 if DP <= 128 else 64
    v_fp8t = torch.empty(B, H, DP, padded_length, device=v.device, dtype=FP8_DTYPE)
    quant_v_fp8_kernel[(triton.cdiv(padded_length, BT), B * H)](
        v,
        *v.stride()[:3],
        v_scale,
        v_fp8t,
        L,
        H,
        padded_length,
        D=D,
        DP=DP,
        BT=BT,
        IS_INTERPRET=IS_INTERPRET,
    )
    return v_fp8t
