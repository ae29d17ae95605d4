"""Triton block-sparse SageSLA attention with the linear branch fused into the epilogue.

Twin of ``sparse_attn_ref.sparse_attn_quant_ref`` (plus ``linear_attn_ref`` when the linear state is given).
One program per (query block, batch * head): Q stays resident as INT8, each selected key block contributes an
INT8 Q.K^T (scores already in base 2), an online exp2 softmax, and a P.V product in FP8 e4m3 (P shifted so its
row maximum is just under 448) or in the compute dtype. The epilogue adds ``phi(q) (S W^T) / (1e-5 + phi(q) . z) + b``
with ``proj_l`` folded into the per-head state once per call.
"""

import torch
import triton
import triton.language as tl

from sagesla.kernels._triton_utils import (
    FEATURE_MAP_IDS,
    IS_INTERPRET,
    feature_map,
    fp8e4m3_round_interpret,
    head_base,
    padded_head_dim,
    tile_ptrs,
)

# log2(448) rounded down: exp2 of it stays below the e4m3 maximum, so P never saturates.
LOG2_FP8_MAX = tl.constexpr(8.807)


@triton.jit
def sparse_attn_fwd_kernel(
    q_int8,
    q_scale,
    k_int8,
    k_scale,
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
    kvw,
    ksum,
    bias,
    o,
    s_ob,
    s_oh,
    s_ol,
    L,
    H,
    NQ,
    NK,
    S,
    LP,
    D: tl.constexpr,
    DP: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    PV_FP8: tl.constexpr,
    HAS_LINEAR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FEATURE: tl.constexpr,
    EVEN_L: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    i_q, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh64 = i_bh.to(tl.int64)
    o_q = i_q * BQ + tl.arange(0, BQ)
    o_k = tl.arange(0, BK)
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    # [BQ, DP] int8, resident
    b_q = tl.load(q_int8 + (i_bh64 * NQ * BQ + o_q[:, None]) * DP + o_d[None, :])
    b_qs = tl.load(q_scale + i_bh64 * NQ + i_q)
    p_lut = lut + (i_bh64 * NQ + i_q) * S
    p_k = k_int8 + i_bh64 * NK * BK * DP
    p_ks = k_scale + i_bh64 * NK
    if PV_FP8:
        p_v = v + i_bh64 * DP * LP
    else:
        p_v = head_base(v, i_bh, H, s_vb, s_vh)

    b_m = tl.full([BQ], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BQ], dtype=tl.float32)
    # [BQ, DP]
    b_acc = tl.zeros([BQ, DP], dtype=tl.float32)
    for s in tl.range(0, S):
        i_k = tl.load(p_lut + s)
        o_t = i_k * BK + o_k
        # [BK, DP] int8
        b_k = tl.load(p_k + o_t[:, None] * DP + o_d[None, :])
        # [BQ, BK] integer dot products; base-2 scores are b_s * b_sc (b_sc > 0, so the row maximum scales too),
        # and the scale goes into the exponent's FMA (H100, B1 H12 L32760: loop 0.567 ms, 1.196 ms in all).
        b_s = tl.dot(b_q, tl.trans(b_k)).to(tl.float32)
        b_sc = b_qs * tl.load(p_ks + i_k)
        if not EVEN_L:
            b_s = tl.where((o_t < L)[None, :], b_s, float("-inf"))
        b_mx = tl.max(b_s, axis=1)
        b_m_blk = b_mx * b_sc
        b_m_new = tl.maximum(b_m, b_m_blk)
        b_alpha = tl.exp2(b_m - b_m_new)
        # Exponent (s - s_max) * sc + bias, bias = s_max * sc - m <= 0: s - s_max is an exact integer difference
        # <= 0, so P <= 1 (2^8.807 < 448 with the FP8 shift) at any score magnitude, however the FMA rounds, and
        # the block holding the row maximum gives it exactly that. (exp2(s * sc - (m - 8.807)) rounds the shift by
        # up to half an ulp of m, 0.25 at |m| ~ 4e6: P reached 2^9, saturated in FP8 while the row sum kept it.)
        b_bias = tl.where(b_m_blk >= b_m_new, 0.0, b_m_blk - b_m_new)
        if PV_FP8:
            b_bias += LOG2_FP8_MAX
        b_p = tl.exp2((b_s - b_mx[:, None]) * b_sc + b_bias[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_acc = b_acc * b_alpha[:, None]
        if PV_FP8:
            # [DP, BK] fp8, keys contiguous
            b_vt = tl.load(p_v + o_d[:, None] * LP + o_t[None, :])
            if IS_INTERPRET:
                b_p = fp8e4m3_round_interpret(b_p)
            b_acc = tl.dot(b_p.to(b_vt.dtype), tl.trans(b_vt), b_acc)
        else:
            # [BK, DP] in the compute dtype
            b_v = tl.load(tile_ptrs(p_v, o_t, s_vl, o_d), mask=(o_t < L)[:, None] & m_d[None, :], other=0.0)
            if IS_INTERPRET:
                b_acc = tl.dot(b_p.to(b_v.dtype).to(tl.float32), b_v.to(tl.float32), b_acc)
            else:
                b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc)
        b_m = b_m_new
    b_o = b_acc / b_l[:, None]
    if PV_FP8:
        b_o = b_o * tl.load(v_scale + i_bh64 * D + o_d, mask=m_d, other=0.0)[None, :]
    m_o = (o_q < L)[:, None] & m_d[None, :]
    if HAS_LINEAR:
        p_q = tile_ptrs(head_base(q, i_bh, H, s_qb, s_qh), o_q, s_ql, o_d)
        b_phi = feature_map(tl.load(p_q, mask=m_o, other=0.0).to(tl.float32), m_d, FEATURE)
        b_z = tl.load(ksum + i_bh64 * DP + o_d)
        b_den = 1e-5 + tl.sum(b_phi * b_z[None, :], axis=1)
        # [DP, DP]: the linear state with proj_l folded in, in bf16 (fp32 accumulation)
        b_kvw = tl.load(kvw + i_bh64 * DP * DP + o_d[:, None] * DP + o_d[None, :])
        if IS_INTERPRET:
            b_o += tl.dot(b_phi, b_kvw.to(tl.float32)) / b_den[:, None]
        else:
            b_o += tl.dot(b_phi.to(tl.bfloat16), b_kvw) / b_den[:, None]
        if HAS_BIAS:
            b_o += tl.load(bias + o_d, mask=m_d, other=0.0)[None, :]
    p_o = tile_ptrs(head_base(o, i_bh, H, s_ob, s_oh), o_q, s_ol, o_d)
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_o)


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
    linear: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    feature_map: str = "softmax",
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Launch the fused kernel; writes ``out`` and returns it.

    Args:
        q_int8: [B, H, NQ*BQ, DP] int8, q_scale: [B, H, NQ] fp32; k_int8: [B, H, NK*BK, DP], k_scale: [B, H, NK].
        v: FP8 ``[B, H, DP, NK*BK]`` (transposed, from ``quant_v_fp8``) with v_scale [B, H, D], or the
            compute-dtype V ``[B, H, L, D]`` view (unit stride on D) with v_scale None.
        lut: [B, H, NQ, S] int32.
        out: [B, H, L, D] view of the output (any strides with unit stride on D, any float dtype).
        linear: (q [B, H, L, D] view, kvw [B, H, DP, DP] bf16 = ``S W^T`` padded, ksum [B, H, DP] fp32, bias [D])
            to fuse the linear branch, or None.
    """
    B, H, L, D = out.shape
    DP, NQ, NK = padded_head_dim(D), q_scale.shape[-1], k_scale.shape[-1]
    pv_fp8 = v_scale is not None
    if linear is None:
        q, kvw, ksum, bias = out, q_scale, q_scale, None
    else:
        q, kvw, ksum, bias = linear
    if num_warps is None:
        num_warps = 4 if block_q <= 64 else 8
    if num_stages is None:
        # H100, 64 x 128 blocks: FP8 P.V 0.565 -> 0.547 ms with 3 stages, bf16 P.V 0.873 -> 0.958 ms.
        num_stages = 3 if pv_fp8 else 2
    sparse_attn_fwd_kernel[(NQ, B * H)](
        q_int8,
        q_scale,
        k_int8,
        k_scale,
        v,
        *(v.stride()[:3] if not pv_fp8 else (0, 0, 0)),
        v_scale if pv_fp8 else q_scale,
        lut,
        q,
        *q.stride()[:3],
        kvw,
        ksum,
        q_scale if bias is None else bias,
        out,
        *out.stride()[:3],
        L,
        H,
        NQ,
        NK,
        lut.shape[-1],
        NK * block_k,
        D=D,
        DP=DP,
        BQ=block_q,
        BK=block_k,
        PV_FP8=pv_fp8,
        HAS_LINEAR=linear is not None,
        HAS_BIAS=bias is not None,
        FEATURE=FEATURE_MAP_IDS[feature_map],
        EVEN_L=L % block_k == 0,
        IS_INTERPRET=IS_INTERPRET,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
