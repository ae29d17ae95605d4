"""Triton block-sparse SageSLA attention with the linear branch fused into the epilogue.

Twin of ``sparse_attn_ref.sparse_attn_quant_ref`` (plus ``linear_attn_ref`` when the linear state is given).
One program per (query block, batch * head): Q stays resident as INT8, each selected key block contributes an
INT8 Q.K^T (scores already in base 2), an online exp2 softmax, and a P.V product in FP8 e4m3 (P shifted so its
row maximum is just under 448) or in the compute dtype. The epilogue adds ``phi(q) (S W^T) / (1e-5 + phi(q) . z) + b``
with ``proj_l`` folded into the per-head state once per call. K, FP8 V and the folded state are read through TMA
descriptors on Hopper (plain loads elsewhere: Triton rewrites them). With a ragged tail each block checks whether it
reaches past L (a uniform branch around the key mask), so the loop has no peeled iteration and the compiler
prefetches every block, the LUT's last entry included; the epilogue issues all of its loads before it computes.
With exact keys the epilogue first merges the normalized output with the extra keys' partial (its output and
base-2 log-sum-exp, computed beforehand), through the sparse part's own log-sum-exp ``m + log2(l)``.
"""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sagesla.kernels._triton_utils import (
    DENOM_EPS,
    FEATURE_MAP_IDS,
    IS_INTERPRET,
    feature_map_unnormalized,
    fp8e4m3_round_interpret,
    head_base,
    padded_head_dim,
    tile_ptrs,
)
from sagesla.kernels.kv_stats import FINISH_ROWS

# log2(448) rounded down: exp2 of it stays below the e4m3 maximum, so P never saturates.
LOG2_FP8_MAX = tl.constexpr(8.807)


@triton.jit
def _attend_block(
    b_q,
    b_qs,
    keys,
    values,
    i_k,
    state,
    L,
    D: tl.constexpr,
    DP: tl.constexpr,
    BK: tl.constexpr,
    PV_FP8: tl.constexpr,
    MASK: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    """One selected key block ``i_k``: online-softmax update of ``state`` = (row max [BQ], row sum [BQ], accumulator
    [BQ, DP]), returned updated. ``keys`` = (K descriptor, the head's first K row, K scales of the head), ``values`` =
    (V^T descriptor, the head's first V^T row, compute-dtype V pointer, its row stride).

    ``MASK`` sets scores of keys >= L to -inf (needed when L is not a multiple of BK; only the tail block has any).
    """
    k_desc, k_row, p_ks = keys
    v_desc, v_row, p_v, s_vl = values
    b_m, b_l, b_acc = state
    o_t = i_k * BK + tl.arange(0, BK)
    # [BK, DP] int8 (TMA on Hopper)
    b_k = k_desc.load([k_row + i_k * BK, 0])
    # [BQ, BK] integer dot products; base-2 scores are b_s * b_sc (b_sc > 0, so the row maximum scales too),
    # and the scale goes into the exponent's FMA.
    b_s = tl.dot(b_q, tl.trans(b_k)).to(tl.float32)
    b_sc = b_qs * tl.load(p_ks + i_k)
    if MASK:  # noqa: SIM102 (a compile-time switch around a runtime branch)
        # a uniform branch: only the block reaching past L pays for the selects
        if i_k * BK + BK > L:
            b_s = tl.where((o_t < L)[None, :], b_s, float("-inf"))
    b_mx = tl.max(b_s, axis=1)
    b_m_blk = b_mx * b_sc
    b_m_new = tl.maximum(b_m, b_m_blk)
    b_alpha = tl.exp2(b_m - b_m_new)
    # Exponent (s - s_max) * sc + bias, bias = s_max * sc - m <= 0: s - s_max is an exact integer difference
    # <= 0, so P <= 1 (2^8.807 < 448 with the FP8 shift) at any score magnitude, however the FMA rounds, and
    # the block holding the row maximum gives it exactly that. (exp2(s * sc - (m - 8.807)) would round the shift by
    # up to half an ulp of m, 0.25 at |m| ~ 4e6: P could reach 2^9 and saturate in FP8 while the row sum kept it.)
    b_bias = tl.where(b_m_blk >= b_m_new, 0.0, b_m_blk - b_m_new)
    if PV_FP8:
        b_bias += LOG2_FP8_MAX
    b_p = tl.exp2((b_s - b_mx[:, None]) * b_sc + b_bias[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * b_alpha[:, None]
    if PV_FP8:
        # [DP, BK] fp8, keys contiguous (TMA on Hopper)
        b_vt = v_desc.load([v_row, i_k * BK])
        if IS_INTERPRET:
            b_p = fp8e4m3_round_interpret(b_p)
        b_acc = tl.dot(b_p.to(b_vt.dtype), tl.trans(b_vt), b_acc)
    else:
        # [BK, DP] in the compute dtype
        o_d = tl.arange(0, DP)
        b_v = tl.load(tile_ptrs(p_v, o_t, s_vl, o_d), mask=(o_t < L)[:, None] & (o_d < D)[None, :], other=0.0)
        if IS_INTERPRET:
            b_acc = tl.dot(b_p.to(b_v.dtype).to(tl.float32), b_v.to(tl.float32), b_acc)
        else:
            b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc)
    return b_m_new, b_l, b_acc


@triton.jit
def sparse_attn_fwd_kernel(
    q_int8,
    q_scale,
    k_desc,
    k_scale,
    v_desc,
    v,
    s_vb,
    s_vh,
    s_vl,
    v_scale,
    lut,
    q,
    s_qb,
    s_qh,
    s_ql,
    kvw_desc,
    ksum,
    w_live,
    bias,
    o_x,
    lse_x,
    o,
    s_ob,
    s_oh,
    s_ol,
    L,
    H,
    NQ,
    NK,
    S,
    D: tl.constexpr,
    DP: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    PV_FP8: tl.constexpr,
    HAS_LINEAR: tl.constexpr,
    LIVE_CHUNKS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FEATURE: tl.constexpr,
    EVEN_L: tl.constexpr,
    HAS_EXACT: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    i_q, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh64 = i_bh.to(tl.int64)
    o_q = i_q * BQ + tl.arange(0, BQ)
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    # [BQ, DP] int8, resident
    b_q = tl.load(q_int8 + (i_bh64 * NQ * BQ + o_q[:, None]) * DP + o_d[None, :])
    b_qs = tl.load(q_scale + i_bh64 * NQ + i_q)
    p_lut = lut + (i_bh64 * NQ + i_q) * S
    # the head's first rows in the 2-D K [B*H*NK*BK, DP] and V^T [B*H*DP, NK*BK] buffers
    keys = (k_desc, i_bh * (NK * BK), k_scale + i_bh64 * NK)
    values = (v_desc, i_bh * DP, head_base(v, i_bh, H, s_vb, s_vh), s_vl)
    # (row max, row sum, [BQ, DP] accumulator)
    state = (
        tl.full([BQ], float("-inf"), dtype=tl.float32),
        tl.zeros([BQ], dtype=tl.float32),
        tl.zeros([BQ, DP], dtype=tl.float32),
    )
    # No peeled iteration for the tail block: peeling the LUT's last entry (the only one that can be the tail when
    # the LUT is ascending) would leave its loads outside the pipelined loop, exposed at the end of every program.
    for s in tl.range(0, S):
        state = _attend_block(
            b_q, b_qs, keys, values, tl.load(p_lut + s), state, L, D, DP, BK, PV_FP8, not EVEN_L, IS_INTERPRET
        )
    b_m, b_l, b_acc = state
    # The epilogue's loads first, so their latencies overlap.
    m_q = o_q < L
    m_o = m_q[:, None] & m_d[None, :]
    if PV_FP8:
        b_vs = tl.load(v_scale + i_bh64 * D + o_d, mask=m_d, other=0.0)
    if HAS_EXACT:
        # [BQ, DP] fp32 normalized output and [BQ] base-2 log-sum-exp of the extra keys (o_x [B*H, L, D] contiguous)
        b_ox = tl.load(o_x + (i_bh64 * L + o_q[:, None]) * D + o_d[None, :], mask=m_o, other=0.0)
        b_lse_x = tl.load(lse_x + i_bh64 * L + o_q, mask=m_q, other=float("-inf"))
    # [BQ] the accumulator's row factor: 1 / l, times the sparse part's weight among exact keys when they are given
    b_share = 1.0 / b_l
    if HAS_EXACT:
        # The sparse part's base-2 log-sum-exp: P was exp2(s - m), shifted by LOG2_FP8_MAX for FP8 P.V.
        b_lse = b_m + tl.log2(b_l)
        if PV_FP8:
            b_lse -= LOG2_FP8_MAX
        # Softmax over the union: weights relative to the larger log-sum-exp (the sparse one is finite; a row without
        # valid extra keys has lse_x = -inf, weight 0). A NaN on either side reaches the output through exp2.
        b_top = tl.maximum(b_lse, b_lse_x)
        b_w = tl.exp2(b_lse - b_top)
        b_w_x = tl.exp2(b_lse_x - b_top)
        b_norm = 1.0 / (b_w + b_w_x)
        b_share = b_share * (b_w * b_norm)
    b_o = b_acc * b_share[:, None]
    if PV_FP8:
        b_o = b_o * b_vs[None, :]
    if HAS_EXACT:
        b_o += b_ox * (b_w_x * b_norm)[:, None]
    # An all-zero proj_l (not fine-tuned) makes S W^T, so the product, exactly zero: skip it, decided on the device.
    # Read after the loop: held across it, the flag would spill under the 168-register cap.
    if HAS_LINEAR:
        b_live = tl.max(tl.load(w_live + i_bh64 * LIVE_CHUNKS + tl.arange(0, LIVE_CHUNKS)), 0)
        if b_live != 0:
            b_x = tl.load(tile_ptrs(head_base(q, i_bh, H, s_qb, s_qh), o_q, s_ql, o_d), mask=m_o, other=0.0)
            b_z = tl.load(ksum + i_bh64 * DP + o_d)
            # [DP, DP]: the linear state with proj_l folded in, in bf16 (fp32 accumulation)
            b_kvw = kvw_desc.load([i_bh * DP, 0])
            # phi = f / n: (phi S) / (1e-5 + phi . z) = (f S) / (1e-5 n + f . z), one division a row
            b_f, b_n = feature_map_unnormalized(b_x.to(tl.float32), m_d, FEATURE)
            b_den = DENOM_EPS * b_n + tl.sum(b_f * b_z[None, :], axis=1)
            # The product accumulates onto o * den, so no second [BQ, DP] accumulator is alive.
            if IS_INTERPRET:
                b_o = tl.dot(b_f, b_kvw.to(tl.float32), b_o * b_den[:, None])
            else:
                b_o = tl.dot(b_f.to(tl.bfloat16), b_kvw, b_o * b_den[:, None])
            b_o = b_o * (1.0 / b_den)[:, None]
    if HAS_BIAS:
        b_o += tl.load(bias + o_d, mask=m_d, other=0.0)[None, :]
    p_o = tile_ptrs(head_base(o, i_bh, H, s_ob, s_oh), o_q, s_ol, o_d)
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_o)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device; None on CPU (the interpreter)."""
    return None if device.type != "cuda" or IS_INTERPRET else torch.cuda.get_device_capability(device)


def _launch_options(capability: tuple[int, int] | None, block_q: int, head_dim: int, pv_fp8: bool) -> dict:
    """num_warps, num_stages and (Hopper, FP8 P.V, D <= 128) a register cap.

    At 64 x 128 blocks the FP8 kernel needs about 217 registers a thread, so two programs share an SM; capped at
    168, three do, and the loop hides its MMA and exp latencies better (faster at the Wan shapes:
    benchmarks/experiments.md, register cap); nothing spills under it. bf16 P.V keeps 2 stages and no cap (its loop
    spills under it).
    """
    options = {"num_warps": 4 if block_q <= 64 else 8, "num_stages": 2}
    if capability is not None and capability[0] == 9 and block_q <= 64 and head_dim <= 128 and pv_fp8:
        options["maxnreg"] = 168
    elif pv_fp8:
        options["num_stages"] = 3
    return options


def _descriptor(x: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """TMA descriptor of a contiguous 2-D buffer (Triton turns its loads into plain loads before Hopper)."""
    return TensorDescriptor(x, list(x.shape), list(x.stride()), block)


def sparse_attn_fwd(
    q_int8: torch.Tensor,
    q_scale: torch.Tensor,
    k_int8: torch.Tensor,
    k_scale: torch.Tensor,
    v: torch.Tensor,
    v_scale: torch.Tensor | None,
    lut: torch.Tensor,
    block_q: int,
    block_k: int,
    out: torch.Tensor,
    *,
    linear: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    exact: tuple[torch.Tensor, torch.Tensor] | None = None,
    feature_map: str = "softmax",
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Launch the fused kernel; writes ``out`` and returns it.

    Args:
        q_int8: [B, H, NQ*BQ, DP] int8, q_scale: [B, H, NQ] fp32; k_int8: [B, H, NK*BK, DP] contiguous,
            k_scale: [B, H, NK].
        v: FP8 ``[B, H, DP, NK*BK]`` contiguous (transposed, from ``quant_v_fp8``) with v_scale [B, H, D], or the
            compute-dtype V ``[B, H, L, D]`` view (unit stride on D) with v_scale None.
        lut: [B, H, NQ, S] int32, key block indices per query block (``select_blocks`` writes them ascending).
        out: [B, H, L, D] view of the output (any strides with unit stride on D, any float dtype).
        linear: (q [B, H, L, D] view, kvw [B, H, DP, DP] bf16 = ``S W^T`` padded, ksum [B, H, DP] fp32, w_live
            [B, H, DP // FINISH_ROWS] int32 (all 0 skips the product: ``S W^T`` is zero), bias [D] or None) to fuse
            the linear branch, or None.
        exact: (o_x [B, H, L, D] fp32 contiguous, lse_x [B, H, L] fp32 contiguous, base 2) the extra keys' partial
            (``exact_keys_ref.exact_partials``, its lse times log2(e)), merged into the sparse output before the
            linear branch is added, or None. With quantized K smoothed by ``k_mean``, the partial must be computed
            against the extra keys minus ``k_mean`` (the same score shift).
    """
    B, H, L, D = out.shape
    DP, NQ, NK = padded_head_dim(D), q_scale.shape[-1], k_scale.shape[-1]
    pv_fp8 = v_scale is not None
    options = _launch_options(device_capability(out.device), block_q, DP, pv_fp8)
    options.update({name: x for name, x in (("num_warps", num_warps), ("num_stages", num_stages)) if x is not None})
    if B * H * NK * block_k >= 2**31:
        # TMA coordinates are int32 (2^31 key rows of INT8 K would be 64 GiB at D 32: no GPU holds such inputs).
        raise NotImplementedError(f"sparse_attn_fwd: {B * H * NK * block_k} key rows exceed 2^31 - 1")
    k_desc = _descriptor(k_int8.view(-1, DP), [block_k, DP])
    # bf16 P.V reads the caller's V through pointers; the descriptor argument is then a placeholder.
    v_desc = _descriptor(v.view(-1, NK * block_k), [DP, block_k]) if pv_fp8 else k_desc
    if linear is None:
        q, kvw_desc, ksum, w_live, bias = out, k_desc, q_scale, q_scale, None
    else:
        q, kvw, ksum, w_live, bias = linear
        kvw_desc = _descriptor(kvw.view(-1, DP), [DP, DP])
    o_x, lse_x = (q_scale, q_scale) if exact is None else exact
    sparse_attn_fwd_kernel[(NQ, B * H)](
        q_int8,
        q_scale,
        k_desc,
        k_scale,
        v_desc,
        v,
        *(v.stride()[:3] if not pv_fp8 else (0, 0, 0)),
        v_scale if pv_fp8 else q_scale,
        lut,
        q,
        *q.stride()[:3],
        kvw_desc,
        ksum,
        w_live,
        q_scale if bias is None else bias,
        o_x,
        lse_x,
        out,
        *out.stride()[:3],
        L,
        H,
        NQ,
        NK,
        lut.shape[-1],
        D=D,
        DP=DP,
        BQ=block_q,
        BK=block_k,
        PV_FP8=pv_fp8,
        HAS_LINEAR=linear is not None,
        LIVE_CHUNKS=DP // FINISH_ROWS,
        HAS_BIAS=bias is not None,
        FEATURE=FEATURE_MAP_IDS[feature_map],
        EVEN_L=L % block_k == 0,
        HAS_EXACT=exact is not None,
        IS_INTERPRET=IS_INTERPRET,
        **options,
    )
    return out
