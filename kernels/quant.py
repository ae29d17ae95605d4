"""Triton prep kernels of SageSLA: K/V reductions in one pass, then per-block INT8 Q/K and FP8 V.

Twin of ``quant_ref.py`` (``quant_qk`` ~ ``quant_qk_ref``, ``quant_v_fp8`` ~ ``quant_v_fp8_ref``). Quantized
tensors are internal buffers laid out for the attention kernel: rows padded to whole blocks and the head dim
padded to DP, both with zeros; V in FP8 is stored transposed ([D, L], keys contiguous), the K-major operand
layout that FP8 matrix instructions need.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sagesla.kernels._triton_utils import (
    FEATURE_MAP_IDS,
    IS_INTERPRET,
    dot,
    feature_map,
    fp8e4m3_round_interpret,
    head_base,
    load_rows,
    padded_head_dim,
    tile_ptrs,
)
from sagesla.kernels.quant_ref import FP8_DTYPE, FP8_MAX, INT8_MAX, SCALE_FLOOR, KVStats, QKQuant, fp8_v_scale

_FP8_MAX = tl.constexpr(FP8_MAX)
_INT8_MAX = tl.constexpr(INT8_MAX)
_SCALE_FLOOR = tl.constexpr(SCALE_FLOOR)
# The token reductions' launch shape (kv_stats' docstring says where the numbers come from).
KV_PROGRAMS, KV_MIN_CHUNK, KV_WARPS, KV_STAGES = 1056, 1536, 4, 3


# Rows of the linear state each finishing program sums (and folds proj_l into).
FINISH_ROWS = 16


class InferenceStats(NamedTuple):
    """What the Triton forward needs from the token reductions, all from one finishing launch (None where not
    asked for).

    k_mean: [B, H, 1, D] fp32 (smoothing).                 v_scale: [B, H, D] fp32 FP8 V scales.
    kvw: [B, H, DP, DP] bf16 ``S W^T``, zero-padded.       z: [B, H, DP] fp32 ``sum phi(k)``, zero-padded.
    w_live: [B, H, DP // FINISH_ROWS] int32, per chunk of FINISH_ROWS rows of ``S W^T``: 0 where they are exactly
    zero in bf16 (an all-zero ``proj_l``), 1 otherwise (NaN included).
    With an all-zero ``proj_l`` weight the state is not computed: kvw is zero, or NaN in the row chunks where K or V
    sums are non-finite (so the product keeps dense attention's NaN), and z is zero.
    """

    k_mean: torch.Tensor
    v_scale: torch.Tensor | None
    kvw: torch.Tensor | None
    z: torch.Tensor | None
    w_live: torch.Tensor | None


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
    maximum, then the quantization, so no whole tile sits in registers (H100, same run, RC 32 against the whole
    tile: INT8 Q 0.067 / 0.477 ms against 0.073 / 0.521, INT8 K 0.078 / 0.526 against 0.087 / 0.597 at B1 H12
    L32760 / B1 H40 L75600; RC 16 or 64, 8 warps, or 4 blocks a program were no faster at both shapes).
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
    scale = tl.maximum(tl.max(a_max), _SCALE_FLOOR) * (1.0 / _INT8_MAX)
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
        b_q = tl.minimum(tl.maximum(_round_half_away(b_x * mult * inv), -_INT8_MAX), _INT8_MAX)
        p_q = x_int8 + (i_bh.to(tl.int64) * N * BLK + o_t[:, None]) * DP + o_d[None, :]
        tl.store(p_q, b_q.to(tl.int8))


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _column_sums(x, ones, IS_INTERPRET: tl.constexpr):
    """x [BT, DP] summed over its rows on the tensor cores: [DP, 16], every column the sum.

    Operands as bf16 high and low parts (16 mantissa bits; bf16 input has no low part), so the sums of K keep
    fp32-like precision (the smoothing mean must match the reference's) where one bf16 product would round each value.
    """
    hi = x.to(tl.bfloat16)
    sums = dot(tl.trans(hi), ones, IS_INTERPRET)
    if x.dtype != tl.bfloat16:
        lo = (x.to(tl.float32) - hi.to(tl.float32)).to(tl.bfloat16)
        sums += dot(tl.trans(lo), ones, IS_INTERPRET)
    return sums


@triton.jit
def _kv_chunk(
    p_k, s_kl, p_v, s_vl, start, end, L, o_d, m_d,
    D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, V_AMAX: tl.constexpr, FEATURE: tl.constexpr,
    LINEAR: tl.constexpr, V_SUMS: tl.constexpr, IS_INTERPRET: tl.constexpr,
):  # fmt: skip
    """The token loop of ``kv_stats_kernel`` over tokens [start, end): (sum of K [DP, 16], max |V| [BT, DP], sum phi(K)
    (``LINEAR``) or sum of V (``V_SUMS``) [DP, 16], phi(K)^T V [DP, DP]), zeros where not computed."""
    ones = tl.full([BT, 16], 1.0, tl.float32).to(tl.bfloat16)
    # [DP, 16]
    a_sum = tl.zeros([DP, 16], dtype=tl.float32)
    a_ksum = tl.zeros([DP, 16], dtype=tl.float32)
    # [BT, DP]
    a_amax = tl.zeros([BT, DP], dtype=tl.float32)
    # [DP, DP]
    b_kv = tl.zeros([DP, DP], dtype=tl.float32)
    for t in tl.range(start, end, BT):
        o_t = t + tl.arange(0, BT)
        m_t = o_t < L
        m_x = m_t[:, None] & m_d[None, :]
        # [BT, DP]
        b_k = tl.load(tile_ptrs(p_k, o_t, s_kl, o_d), mask=m_x, other=0.0)
        a_sum += _column_sums(b_k, ones, IS_INTERPRET)
        if V_AMAX or LINEAR or V_SUMS:
            b_v = tl.load(tile_ptrs(p_v, o_t, s_vl, o_d), mask=m_x, other=0.0)
            if V_AMAX:
                a_amax = tl.maximum(a_amax, tl.abs(b_v.to(tl.float32)))
            if LINEAR:
                # phi rounded to V's dtype once, for both products: the normaliser sums the values the state weighs,
                # and one shared operand costs less than a high/low split (tests: within TOL_KV_STATE of fp32).
                b_phi = tl.where(m_t[:, None], feature_map(b_k.to(tl.float32), m_d, FEATURE), 0.0).to(b_v.dtype)
                a_ksum += dot(tl.trans(b_phi), ones.to(b_phi.dtype), IS_INTERPRET)
                b_kv += dot(tl.trans(b_phi), b_v, IS_INTERPRET)
            if V_SUMS:
                a_ksum += _column_sums(b_v, ones, IS_INTERPRET)
    return a_sum, a_amax, a_ksum, b_kv


@triton.jit
def _any_nonzero(weight, o_d, m_d, D: tl.constexpr):
    """Whether proj_l's [D, D] fp32 ``weight`` holds a non-zero (NaN included): a scalar int32."""
    b_w = tl.load(weight + o_d[:, None] * D + o_d[None, :], mask=m_d[:, None] & m_d[None, :], other=0.0)
    return tl.max(tl.max((b_w != 0).to(tl.int32), 1), 0)


@triton.jit
def kv_stats_kernel(
    k,
    s_kb,
    s_kh,
    s_kl,
    v,
    s_vb,
    s_vh,
    s_vl,
    weight,
    k_sum,
    v_amax,
    kv,
    ksum,
    L,
    H,
    CHUNK,
    D: tl.constexpr,
    DP: tl.constexpr,
    BT: tl.constexpr,
    V_AMAX: tl.constexpr,
    FEATURE: tl.constexpr,
    HAS_LINEAR: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    """Partial reductions over one chunk of tokens: sum of K, max |V| per channel, phi(K)^T V, sum phi(K).

    The token sums run on the tensor cores as products with a ones tile ([DP, 16] accumulators, every column the
    same sum, read back by a NaN-keeping max) and the maxima elementwise in a [BT, DP] tile, so the loop has no
    cross-thread reduction, only one per program at the end (per-tile ``tl.sum(axis=0)`` cost as much as the state).

    Given proj_l's ``weight`` (the forward) and it is all zero, the linear state is never read (``S W^T`` = 0): the
    loop sums V instead of phi(K) into ``ksum`` (the finishing launch only needs to know whether S would hold a
    NaN/Inf, which the K and V sums tell) and writes no state.
    """
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    p_k = head_base(k, i_bh, H, s_kb, s_kh)
    p_v = head_base(v, i_bh, H, s_vb, s_vh)
    start = i_c * CHUNK
    end = tl.minimum(start + CHUNK, L)
    live = tl.full([], 1, tl.int32)
    if HAS_LINEAR and weight is not None:
        live = _any_nonzero(weight, o_d, m_d, D)
        if live != 0:
            a_sum, a_amax, a_ksum, b_kv = _kv_chunk(
                p_k, s_kl, p_v, s_vl, start, end, L, o_d, m_d, D, DP, BT, V_AMAX, FEATURE, True, False, IS_INTERPRET
            )
        else:
            a_sum, a_amax, a_ksum, b_kv = _kv_chunk(
                p_k, s_kl, p_v, s_vl, start, end, L, o_d, m_d, D, DP, BT, V_AMAX, FEATURE, False, True, IS_INTERPRET
            )
    else:
        a_sum, a_amax, a_ksum, b_kv = _kv_chunk(
            p_k, s_kl, p_v, s_vl, start, end, L, o_d, m_d, D, DP, BT, V_AMAX, FEATURE, HAS_LINEAR, False, IS_INTERPRET
        )
    i_out = i_bh.to(tl.int64) * tl.num_programs(0) + i_c
    tl.store(k_sum + i_out * DP + o_d, tl.reduce(a_sum, 1, _max_keep_nan))
    if V_AMAX:
        tl.store(v_amax + i_out * DP + o_d, tl.max(a_amax, axis=0))
    if HAS_LINEAR:
        tl.store(ksum + i_out * DP + o_d, tl.reduce(a_ksum, 1, _max_keep_nan))
        tl.store(kv + i_out * DP * DP + o_d[:, None] * DP + o_d[None, :], b_kv, mask=live != 0)


@triton.jit
def kv_stats_finish_kernel(
    k_sum,
    v_amax,
    kv,
    ksum,
    k_mean_out,
    v_amax_out,
    kv_out,
    ksum_out,
    weight,
    v_scale_out,
    kvw_out,
    z_out,
    w_live_out,
    L,
    C,
    D: tl.constexpr,
    DP: tl.constexpr,
    RB: tl.constexpr,
    V_AMAX: tl.constexpr,
    HAS_LINEAR: tl.constexpr,
):
    """Sums (V: maxima) of ``kv_stats_kernel``'s C partials per head: RB rows of the state and the same RB channels
    of each vector statistic per program; outputs unpadded ([B*H, D] vectors, [B*H, D, D] state).

    Each output that is not None is written (``kv_stats``: V maxima, state and key sum; the forward, through
    ``inference_stats``: the FP8 V scales ``max(amax, floor) / 448`` ([B*H, D]) and the fused kernel's linear
    operands, ``S W^T`` in bf16 ([B*H, DP, DP], zero-padded; ``weight`` = proj_l's [D, D] fp32), ``z`` ([B*H, DP]
    fp32, zero-padded) and ``w_live`` ([B*H, DP // RB] int32: whether each program's rows of ``S W^T`` hold a
    non-zero, so the fused kernel skips the product of an all-zero ``proj_l`` without a host-side check), so the
    forward needs no torch op between its launches).
    """
    i_r, i_bh = tl.program_id(0), tl.program_id(1)
    o_r = i_r * RB + tl.arange(0, RB)
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    # As kv_stats_kernel decided it: with an all-zero weight the partials hold V sums and no state.
    live = tl.full([], 1, tl.int32)
    if kvw_out is not None:
        live = _any_nonzero(weight, o_d, m_d, D)
    a_sum = tl.zeros([RB], dtype=tl.float32)
    a_amax = tl.zeros([RB], dtype=tl.float32)
    a_ksum = tl.zeros([RB], dtype=tl.float32)
    # [RB, DP]
    a_kv = tl.zeros([RB, DP], dtype=tl.float32)
    for c in tl.range(0, C):
        i_part = i_bh.to(tl.int64) * C + c
        a_sum += tl.load(k_sum + i_part * DP + o_r)
        if V_AMAX:
            a_amax = _max_keep_nan(a_amax, tl.load(v_amax + i_part * DP + o_r))
        if HAS_LINEAR:
            a_ksum += tl.load(ksum + i_part * DP + o_r)
            a_kv += tl.load(kv + (i_part * DP + o_r[:, None]) * DP + o_d[None, :], mask=live != 0, other=0.0)
    m_r = o_r < D
    p_vec = i_bh.to(tl.int64) * D + o_r
    tl.store(k_mean_out + p_vec, a_sum / L, mask=m_r)
    if v_amax_out is not None:
        tl.store(v_amax_out + p_vec, a_amax, mask=m_r)
    if v_scale_out is not None:
        scale = tl.maximum(a_amax, _SCALE_FLOOR, propagate_nan=tl.PropagateNan.ALL) * (1.0 / _FP8_MAX)
        tl.store(v_scale_out + p_vec, scale, mask=m_r)
    if kv_out is not None:
        tl.store(ksum_out + p_vec, a_ksum, mask=m_r)
        p_kv = kv_out + (i_bh.to(tl.int64) * D + o_r[:, None]) * D + o_d[None, :]
        tl.store(p_kv, a_kv, mask=m_r[:, None] & (o_d < D)[None, :])
    if kvw_out is not None:
        p_kvw = kvw_out + (i_bh.to(tl.int64) * DP + o_r[:, None]) * DP + o_d[None, :]
        p_live = w_live_out + i_bh.to(tl.int64) * (DP // RB) + i_r
        if live != 0:
            # [DP, DP] proj_l weight W (rows: output channels), zero-padded
            b_w = tl.load(weight + o_d[:, None] * D + o_d[None, :], mask=m_d[:, None] & m_d[None, :], other=0.0)
            # [RB, DP] rows of S W^T at fp32 accuracy on the tensor cores (3xTF32), then bf16 as the kernel reads
            # it: 0.03 % of entries one bf16 ulp off the torch fold's
            b_kvw = tl.dot(a_kv, tl.trans(b_w), input_precision="tf32x3").to(tl.bfloat16)
            tl.store(p_kvw, b_kvw)
            # Whether these rows are non-zero (NaN != 0 holds, so a NaN keeps the product and its NaN in the output).
            tl.store(p_live, tl.max(tl.max((b_kvw != 0).to(tl.int32), 1), 0))
            tl.store(z_out + i_bh.to(tl.int64) * DP + o_r, a_ksum)
        else:
            # S W^T = 0, but 0 * NaN is NaN: S holds a NaN/Inf where the K or V sums do (phi keeps a non-finite
            # key). These rows become NaN, so the product spreads it over the head as dense attention does.
            # (|x| < inf is False for NaN.)
            bad = ((tl.abs(a_sum) < float("inf")) & (tl.abs(a_ksum) < float("inf"))) == 0
            b_kvw = tl.where(bad[:, None], float("nan"), tl.zeros([RB, DP], dtype=tl.float32)).to(tl.bfloat16)
            tl.store(p_kvw, b_kvw)
            tl.store(p_live, tl.max(bad.to(tl.int32), 0))
            tl.store(z_out + i_bh.to(tl.int64) * DP + o_r, tl.zeros([RB], dtype=tl.float32))


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
    b_v = tl.minimum(tl.maximum(b_v * b_inv[None, :], -448.0), 448.0)
    if IS_INTERPRET:
        b_v = fp8e4m3_round_interpret(b_v)
    p_out = v_fp8t + i_bh.to(tl.int64) * DP * LP + o_d[None, :].to(tl.int64) * LP + o_t[:, None]
    tl.store(p_out, b_v.to(v_fp8t.dtype.element_ty), mask=(o_t < LP)[:, None])


def _stats_grid(length: int, heads: int, block: int, programs: int, min_chunk: int) -> tuple[int, int]:
    """(chunks per head, chunk length): at most about ``programs`` programs in all, chunks of at least
    ``min_chunk`` tokens where the length allows, a multiple of ``block``."""
    blocks = triton.cdiv(length, block)
    chunks = max(1, min(blocks, triton.cdiv(programs, heads), triton.cdiv(length, min_chunk)))
    return chunks, triton.cdiv(blocks, chunks) * block


def _kv_reduce(
    k: torch.Tensor,
    v: torch.Tensor,
    v_amax: bool,
    feature_map: str | None,
    inference: bool,
    weight: torch.Tensor | None = None,
    programs: int = KV_PROGRAMS,
    min_chunk: int = KV_MIN_CHUNK,
    num_warps: int = KV_WARPS,
    num_stages: int = KV_STAGES,
) -> tuple[KVStats, InferenceStats]:
    """Both launches of the token reductions (chunk partials, then their sums); see ``kv_stats``. Writes the
    reference's statistics (KVStats; InferenceStats then holds only k_mean), or with ``inference`` what the forward
    reads (InferenceStats, the fold needing proj_l's ``weight`` with ``feature_map``; KVStats holds only k_mean)."""
    B, H, L, D = k.shape
    DP, BT = padded_head_dim(D), 32
    chunks, chunk = _stats_grid(L, B * H, BT, programs, min_chunk)
    linear = feature_map is not None
    k_sum = torch.empty(B, H, chunks, DP, device=k.device, dtype=torch.float32)
    amax = torch.empty_like(k_sum) if v_amax else k_sum
    ksum = torch.empty_like(k_sum) if linear else k_sum
    kv = torch.empty(B, H, chunks, DP, DP, device=k.device, dtype=torch.float32) if linear else k_sum
    weight = weight.float().contiguous() if linear and inference else None
    kv_stats_kernel[(chunks, B * H)](
        k,
        *k.stride()[:3],
        v,
        *v.stride()[:3],
        weight,
        k_sum,
        amax,
        kv,
        ksum,
        L,
        H,
        chunk,
        D=D,
        DP=DP,
        BT=BT,
        V_AMAX=v_amax,
        FEATURE=FEATURE_MAP_IDS[feature_map or "softmax"],
        HAS_LINEAR=linear,
        IS_INTERPRET=IS_INTERPRET,
        num_warps=num_warps,
        num_stages=num_stages,
    )

    def empty(wanted, *shape, dtype=torch.float32):
        return torch.empty(B, H, *shape, device=k.device, dtype=dtype) if wanted else None

    k_mean = empty(True, 1, D)
    out_amax, out_scale = empty(v_amax and not inference, D), empty(v_amax and inference, D)
    out_kv, out_ksum = empty(linear and not inference, D, D), empty(linear and not inference, D)
    kvw, z = empty(linear and inference, DP, DP, dtype=torch.bfloat16), empty(linear and inference, DP)
    w_live = empty(linear and inference, DP // FINISH_ROWS, dtype=torch.int32)
    # One launch for the partials' sums (H100, B1 H12 L32760: 0.036 ms as five torch reductions).
    kv_stats_finish_kernel[(DP // FINISH_ROWS, B * H)](
        k_sum,
        amax,
        kv,
        ksum,
        k_mean,
        out_amax,
        out_kv,
        out_ksum,
        weight,
        out_scale,
        kvw,
        z,
        w_live,
        L,
        chunks,
        D=D,
        DP=DP,
        RB=FINISH_ROWS,
        V_AMAX=v_amax,
        HAS_LINEAR=linear,
    )
    return KVStats(k_mean, out_amax, out_kv, out_ksum), InferenceStats(k_mean, out_scale, kvw, z, w_live)


def kv_stats(
    k: torch.Tensor,
    v: torch.Tensor,
    v_amax: bool,
    feature_map: str | None,
    *,
    programs: int = KV_PROGRAMS,
    min_chunk: int = KV_MIN_CHUNK,
    num_warps: int = KV_WARPS,
    num_stages: int = KV_STAGES,
) -> KVStats:
    """Triton twin of ``kv_stats_ref``: every token reduction of K and V in one pass over both.

    Args:
        k, v: [B, H, L, D] views with unit stride on D.
        v_amax: compute the per-channel max of |V|.
        feature_map: phi of the linear branch, or None to skip its state.
        programs, min_chunk, num_warps, num_stages: launch shape: token chunks x heads programs, up to about
            ``programs`` of them with chunks of at least ``min_chunk`` tokens (each chunk's partial state, DP x DP
            fp32, is written and summed afterwards). The defaults come from H100 sweeps at the Wan shapes
            (benchmarks/README.md): 264 programs of 1504 tokens at B1 H12 L32760, 1080 of 2816 at B1 H40 L75600
            (there 0.84 -> 0.76 ms against 560 programs).
    Returns:
        KVStats as the reference (fp32, unpadded).
    """
    return _kv_reduce(k, v, v_amax, feature_map, False, None, programs, min_chunk, num_warps, num_stages)[0]


def inference_stats(
    k: torch.Tensor, v: torch.Tensor, pv_fp8: bool, feature_map: str | None, weight: torch.Tensor | None
) -> InferenceStats:
    """``kv_stats`` as the forward consumes it: the same reductions, and in their finishing launch the FP8 V
    scales (``pv_fp8``) and ``proj_l`` folded into the linear state (``weight`` [D, D] and ``feature_map``, or
    neither), where ``quant_v_fp8`` and ``linear_attn.folded_state`` would be six small torch ops (CPU launch time).
    The reference's statistics the forward does not read (V maxima, the unfolded state) are not written.
    """
    if (weight is None) != (feature_map is None):
        raise ValueError(f"inference_stats: weight and feature_map go together (feature_map={feature_map!r})")
    return _kv_reduce(k, v, pv_fp8, feature_map, True, weight)[1]


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
    # H100, B1 H12 L32760 D128: 128-token tiles 0.061 ms, 64 0.067 (B1 H40 L75600: 0.390, 0.422).
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
