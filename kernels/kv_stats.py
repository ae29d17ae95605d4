"""Triton token reductions of K and V in one pass: K mean, V channel maxima, linear state phi(K)^T V, sum phi(K).

Twin of ``kv_stats_ref.py`` (``kv_stats`` ~ ``kv_stats_ref``). ``inference_stats`` is the forward's variant: the
same reductions, and in their finishing launch the FP8 V scales (``quant_ref.fp8_v_scale``) and ``proj_l`` folded
into the linear state (``linear_attn_train.folded_state``).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sagesla.kernels._triton_utils import (
    FEATURE_MAP_IDS,
    FP8_MAX,
    IS_INTERPRET,
    SCALE_FLOOR,
    dot,
    feature_map,
    head_base,
    padded_head_dim,
    tile_ptrs,
)
from sagesla.kernels.kv_stats_ref import KVStats

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
    cross-thread reduction, only one per program at the end (a per-tile ``tl.sum(axis=0)`` costs as much as the
    state: benchmarks/experiments.md, K/V reductions).

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
        scale = tl.maximum(a_amax, SCALE_FLOOR, propagate_nan=tl.PropagateNan.ALL) * (1.0 / FP8_MAX)
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
    # One launch sums the partials: cheaper than torch reductions (benchmarks/experiments.md, K/V reductions).
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
            fp32, is written and summed afterwards). The defaults are the fastest of the sweeps at the Wan shapes
            (benchmarks/experiments.md, K/V reductions).
    Returns:
        KVStats as the reference (fp32, unpadded).
    """
    return _kv_reduce(k, v, v_amax, feature_map, False, None, programs, min_chunk, num_warps, num_stages)[0]


def inference_stats(
    k: torch.Tensor, v: torch.Tensor, pv_fp8: bool, feature_map: str | None, weight: torch.Tensor | None
) -> InferenceStats:
    """``kv_stats`` as the forward consumes it: the same reductions, and in their finishing launch the FP8 V
    scales (``pv_fp8``) and ``proj_l`` folded into the linear state (``weight`` [D, D] and ``feature_map``, or
    neither), where ``quant_v_fp8`` and ``linear_attn_train.folded_state`` would be six small torch ops (CPU launch
    time).
    The reference's statistics the forward does not read (V maxima, the unfolded state) are not written.
    """
    if (weight is None) != (feature_map is None):
        raise ValueError(f"inference_stats: weight and feature_map go together (feature_map={feature_map!r})")
    return _kv_reduce(k, v, pv_fp8, feature_map, True, weight)[1]
