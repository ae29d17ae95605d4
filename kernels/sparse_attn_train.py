"""Triton block-sparse attention of the trainable SLA: forward saving the log-sum-exp, and backward.

Twin of ``sparse_attn_ref.sparse_attn_ref`` with autograd (plus ``linear_attn_ref`` when the linear branch is
fused). Unquantized: Q.K^T and P.V in the compute dtype (fp16 / bf16) with fp32 accumulation, scores in base 2
(``sm_scale * log2(e)`` folded in), any L (masked tails), head dims padded to DP = a power of two.

- Forward, one program per (query block, batch * head): Q resident, an online exp2 softmax over the key blocks of
  ``lut``; the epilogue adds the linear branch and ``proj_l`` (scope "complement" subtracts the selected blocks'
  share inside the loop or, when fewer blocks are left out, sums those in a second loop: see
  ``linear_attn_train``) and stores ``out`` and the natural-log LSE per row. Only ``out`` and the LSE are kept for
  the backward, as SDPA keeps.
- Backward dQ, one program per (query block, head): ``delta = rowsum(dO * o_s)`` for the sparse branch's output
  ``o_s = out - proj_l(o_l)`` (from ``linear_attn_bwd_q`` with the linear branch, else here; stored for dK/dV; when
  scope "complement" sums the unselected blocks, ``rowsum(P * dO V^T)`` from a first walk), then the same walk:
  ``P = exp2(S - LSE)``, ``dS = P * (dO V^T - delta)``, ``dQ += dS K``.
- Backward dK/dV, one program per (key block, head), longest first: walks the query blocks that selected the key
  block (``key_block_queries``, the inverse of ``lut``), ``dV += P^T dO``, ``dK += dS^T Q``; the epilogue adds the
  linear branch's key side (``dS_lin``, ``dz`` from ``linear_attn_bwd_q``).
Every sum runs in a fixed order inside one program (no atomics): results are bit-identical run to run.
"""

import torch
import triton
import triton.language as tl

from sagesla.kernels._triton_utils import (
    FEATURE_MAP_IDS,
    IS_INTERPRET,
    LN2,
    LOG2E,
    dot,
    even_tiles,
    feature_map,
    feature_map_vjp,
    head_base,
    load_rows,
    padded_head_dim,
    tile_ptrs,
)
from sagesla.kernels.block_select_ref import lut_to_mask
from sagesla.kernels.linear_attn_train import (
    LinearGrads,
    LinearState,
    complement_step,
    complement_sums,
    linear_rows,
    phi_rows,
    sums_unselected,
    unselected_blocks,
)

# (num_warps, num_stages) per kernel: "plain" for DP <= 128, "complement" for scope "complement" (more live tiles),
# "wide" for DP > 128 (one stage keeps shared memory under 164 KB). "plain": the fastest of
# scripts/bench_attention.py --sweep at the Wan2.1-1.3B shape (benchmarks/experiments.md, trainable SLA launch).
LAUNCH = {
    "fwd": {"plain": (4, 3), "complement": (8, 2), "wide": (8, 1)},
    "dq": {"plain": (4, 2), "complement": (8, 2), "wide": (8, 1)},
    "dkv": {"plain": (4, 2), "complement": (8, 2), "wide": (8, 1)},
}


@triton.jit
def complement_grad_q(
    b_u, b_r, b_t, b_k, b_v, o_t, L, m_d, FEATURE: tl.constexpr, EVEN: tl.constexpr, IS_INTERPRET: tl.constexpr
):
    """dLoss/dphi(q) [BQ, DP] through one walked key block's share counted positively: ``dA phi(k)`` with
    ``dA = dnum v^T + dden = (u v^T + t) r`` [BQ, BK] (rows' u [BQ, DP], r, t [BQ] of ``linear_attn_bwd_q``)."""
    b_phik = phi_rows(b_k, o_t, L, m_d, FEATURE, EVEN)
    b_da = (dot(b_u, tl.trans(b_v), IS_INTERPRET) + b_t[:, None]) * b_r[:, None]
    return dot(b_da.to(b_k.dtype), b_phik.to(b_k.dtype), IS_INTERPRET)


@triton.jit
def complement_grad_k(
    b_phik,
    b_v,
    b_q,
    o_q,
    p_u,
    p_r,
    p_t,
    o_d,
    L,
    D: tl.constexpr,
    FEATURE: tl.constexpr,
    EVEN: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    """(dLoss/dphi(k), dLoss/dv) [BK, DP] through one walked pair of blocks' share counted positively:
    ``dA^T phi(q)`` and ``A^T dnum`` for A = phi(q) phi(k)^T, dA as in ``complement_grad_q``; p_u, p_r, p_t: the
    head's rows of u, r, t."""
    m_q = o_q < L
    b_phiq = phi_rows(b_q, o_q, L, o_d < D, FEATURE, EVEN).to(b_q.dtype)
    b_u = load_rows(p_u, o_q, D, o_d, L, D, EVEN)
    b_r = tl.load(p_r + o_q, mask=m_q, other=0.0)
    b_t = tl.load(p_t + o_q, mask=m_q, other=0.0)
    # [BK, BQ] A^T and dA^T
    b_at = dot(b_phik.to(b_q.dtype), tl.trans(b_phiq), IS_INTERPRET)
    b_dat = (dot(b_v, tl.trans(b_u), IS_INTERPRET) + b_t[None, :]) * b_r[None, :]
    b_dphi = dot(b_dat.to(b_q.dtype), b_phiq, IS_INTERPRET)
    return b_dphi, dot((b_at * b_r[None, :]).to(b_u.dtype), b_u, IS_INTERPRET)


@triton.jit
def sla_train_fwd_kernel(
    q,
    s_qb,
    s_qh,
    s_ql,
    k,
    s_kb,
    s_kh,
    s_kl,
    v,
    s_vb,
    s_vh,
    s_vl,
    lut,
    rest,
    lse,
    out,
    s_ob,
    s_oh,
    s_ol,
    kw,
    z,
    w,
    bias,
    qk_scale,
    L,
    H,
    NQ,
    S,
    NR,
    D: tl.constexpr,
    DP: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    HAS_LINEAR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPLEMENT: tl.constexpr,
    DIRECT: tl.constexpr,
    FEATURE: tl.constexpr,
    EVEN: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    i_q, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh64 = i_bh.to(tl.int64)
    o_q = i_q * BQ + tl.arange(0, BQ)
    o_k = tl.arange(0, BK)
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    m_o = (o_q < L)[:, None] & m_d[None, :]
    p_k = head_base(k, i_bh, H, s_kb, s_kh)
    p_v = head_base(v, i_bh, H, s_vb, s_vh)
    p_lut = lut + (i_bh64 * NQ + i_q) * S
    # [BQ, DP] resident
    b_q = load_rows(head_base(q, i_bh, H, s_qb, s_qh), o_q, s_ql, o_d, L, D, EVEN)
    if COMPLEMENT:
        b_phiq = feature_map(b_q.to(tl.float32), m_d, FEATURE)
    b_m = tl.full([BQ], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BQ], dtype=tl.float32)
    # [BQ, DP]
    b_acc = tl.zeros([BQ, DP], dtype=tl.float32)
    b_cn = tl.zeros([BQ, DP], dtype=tl.float32)
    b_cd = tl.zeros([BQ], dtype=tl.float32)
    for s in tl.range(0, S):
        o_t = tl.load(p_lut + s) * BK + o_k
        # [BK, DP]
        b_k = load_rows(p_k, o_t, s_kl, o_d, L, D, EVEN)
        b_v = load_rows(p_v, o_t, s_vl, o_d, L, D, EVEN)
        # [BQ, BK] base-2 scores
        b_s = dot(b_q, tl.trans(b_k), IS_INTERPRET) * qk_scale
        if not EVEN:
            b_s = tl.where((o_t < L)[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_alpha = tl.exp2(b_m - b_m_new)
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_acc = b_acc * b_alpha[:, None] + dot(b_p.to(b_v.dtype), b_v, IS_INTERPRET)
        b_m = b_m_new
        if COMPLEMENT and not DIRECT:
            b_cn, b_cd = complement_step(b_phiq, b_k, b_v, o_t, L, m_d, b_cn, b_cd, FEATURE, DIRECT, EVEN, IS_INTERPRET)
    if DIRECT:
        # the NR key blocks left out: the branch's own sums
        p_rest = rest + (i_bh64 * NQ + i_q) * NR
        b_cn, b_cd = complement_sums(
            b_phiq, p_rest, NR, p_k, s_kl, p_v, s_vl, o_d, L, D, BQ, BK, DP, FEATURE, DIRECT, EVEN, IS_INTERPRET
        )
    b_o = b_acc / b_l[:, None]
    tl.store(lse + i_bh64 * L + o_q, (b_m + tl.log2(b_l)) * LN2, mask=o_q < L)
    if HAS_LINEAR:
        if not COMPLEMENT:
            b_phiq = feature_map(b_q.to(tl.float32), m_d, FEATURE)
        b_y, _ = linear_rows(
            b_phiq, kw + i_bh64 * DP * DP, z + i_bh64 * DP, w, o_d, b_cn, b_cd, DP, COMPLEMENT, DIRECT, IS_INTERPRET
        )
        b_o += b_y
    if HAS_BIAS:
        b_o += tl.load(bias + o_d, mask=m_d, other=0.0)[None, :]
    tl.store(tile_ptrs(head_base(out, i_bh, H, s_ob, s_oh), o_q, s_ol, o_d), b_o.to(out.dtype.element_ty), mask=m_o)


@triton.jit
def sla_train_bwd_dq_kernel(
    q,
    s_qb,
    s_qh,
    s_ql,
    k,
    s_kb,
    s_kh,
    s_kl,
    v,
    s_vb,
    s_vh,
    s_vl,
    do,
    s_db,
    s_dh,
    s_dl,
    out,
    s_ob,
    s_oh,
    s_ol,
    bias,
    lut,
    rest,
    lse,
    delta,
    dq,
    s_gb,
    s_gh,
    s_gl,
    dq_lin,
    u,
    r,
    t,
    qk_scale,
    sm_scale,
    L,
    H,
    NQ,
    S,
    NR,
    D: tl.constexpr,
    DP: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    HAS_LINEAR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPLEMENT: tl.constexpr,
    DIRECT: tl.constexpr,
    FEATURE: tl.constexpr,
    EVEN: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    i_q, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh64 = i_bh.to(tl.int64)
    o_q = i_q * BQ + tl.arange(0, BQ)
    o_k = tl.arange(0, BK)
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    m_q = o_q < L
    p_k = head_base(k, i_bh, H, s_kb, s_kh)
    p_v = head_base(v, i_bh, H, s_vb, s_vh)
    p_lut = lut + (i_bh64 * NQ + i_q) * S
    # [BQ, DP] resident
    b_q = load_rows(head_base(q, i_bh, H, s_qb, s_qh), o_q, s_ql, o_d, L, D, EVEN)
    b_do = load_rows(head_base(do, i_bh, H, s_db, s_dh), o_q, s_dl, o_d, L, D, EVEN)
    # [BQ] delta = rowsum(dO * o_s): given with the linear branch, else o_s = out - bias
    if not HAS_LINEAR:
        b_os = load_rows(head_base(out, i_bh, H, s_ob, s_oh), o_q, s_ol, o_d, L, D, EVEN).to(tl.float32)
        if HAS_BIAS:
            b_os -= tl.load(bias + o_d, mask=m_d, other=0.0)[None, :]
        b_delta = tl.sum(b_do.to(tl.float32) * b_os, axis=1)
        tl.store(delta + i_bh64 * L + o_q, b_delta, mask=m_q)
    elif not DIRECT:
        b_delta = tl.load(delta + i_bh64 * L + o_q, mask=m_q, other=0.0)
    b_lse = tl.load(lse + i_bh64 * L + o_q, mask=m_q, other=0.0) * LOG2E
    b_do = b_do.to(b_q.dtype)
    if DIRECT:
        # delta = rowsum(P * dP) in a first walk: a few keys left out make proj_l(o_l) outweigh o_s in ``out``,
        # whose rounding then swamps out - proj_l(o_l)
        b_delta = tl.zeros([BQ], dtype=tl.float32)
        for s in tl.range(0, S):
            o_t = tl.load(p_lut + s) * BK + o_k
            b_k = load_rows(p_k, o_t, s_kl, o_d, L, D, EVEN)
            b_v = load_rows(p_v, o_t, s_vl, o_d, L, D, EVEN)
            # keys past L: V reads 0 there, so dP is 0
            b_p = tl.exp2(dot(b_q, tl.trans(b_k), IS_INTERPRET) * qk_scale - b_lse[:, None])
            b_delta += tl.sum(b_p * dot(b_do, tl.trans(b_v), IS_INTERPRET), axis=1)
        tl.store(delta + i_bh64 * L + o_q, b_delta, mask=m_q)
    if COMPLEMENT:
        b_phiq = feature_map(b_q.to(tl.float32), m_d, FEATURE)
        b_u = load_rows(u + i_bh64 * L * D, o_q, D, o_d, L, D, EVEN)
        b_r = tl.load(r + i_bh64 * L + o_q, mask=m_q, other=0.0)
        b_t = tl.load(t + i_bh64 * L + o_q, mask=m_q, other=0.0)
    # [BQ, DP]
    b_dq = tl.zeros([BQ, DP], dtype=tl.float32)
    b_dphi = tl.zeros([BQ, DP], dtype=tl.float32)
    for s in tl.range(0, S):
        o_t = tl.load(p_lut + s) * BK + o_k
        # [BK, DP]
        b_k = load_rows(p_k, o_t, s_kl, o_d, L, D, EVEN)
        b_v = load_rows(p_v, o_t, s_vl, o_d, L, D, EVEN)
        # [BQ, BK]; keys past L need no mask here: their rows of K and V read 0, so they add 0 to dQ
        b_p = tl.exp2(dot(b_q, tl.trans(b_k), IS_INTERPRET) * qk_scale - b_lse[:, None])
        b_dp = dot(b_do, tl.trans(b_v), IS_INTERPRET)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += dot(b_ds.to(b_k.dtype), b_k, IS_INTERPRET)
        if COMPLEMENT and not DIRECT:
            # this block's share is subtracted from the whole state's
            b_dphi -= complement_grad_q(b_u, b_r, b_t, b_k, b_v, o_t, L, m_d, FEATURE, EVEN, IS_INTERPRET)
    if DIRECT:
        p_rest = rest + (i_bh64 * NQ + i_q) * NR
        for s in tl.range(0, NR):
            o_t = tl.load(p_rest + s) * BK + o_k
            b_k = load_rows(p_k, o_t, s_kl, o_d, L, D, EVEN)
            b_v = load_rows(p_v, o_t, s_vl, o_d, L, D, EVEN)
            b_dphi += complement_grad_q(b_u, b_r, b_t, b_k, b_v, o_t, L, m_d, FEATURE, EVEN, IS_INTERPRET)
    b_dq *= sm_scale
    m_o = m_q[:, None] & m_d[None, :]
    if HAS_LINEAR and not DIRECT:
        b_dq += tl.load(tile_ptrs(dq_lin + i_bh64 * L * D, o_q, D, o_d), mask=m_o, other=0.0)
    if COMPLEMENT:
        b_dq += feature_map_vjp(b_q.to(tl.float32), b_phiq, b_dphi, FEATURE)
    tl.store(tile_ptrs(head_base(dq, i_bh, H, s_gb, s_gh), o_q, s_gl, o_d), b_dq.to(dq.dtype.element_ty), mask=m_o)


@triton.jit
def sla_train_bwd_dkv_kernel(
    q,
    s_qb,
    s_qh,
    s_ql,
    k,
    s_kb,
    s_kh,
    s_kl,
    v,
    s_vb,
    s_vh,
    s_vl,
    do,
    s_db,
    s_dh,
    s_dl,
    lse,
    delta,
    index,
    count,
    order,
    dk,
    s_kgb,
    s_kgh,
    s_kgl,
    dv,
    s_vgb,
    s_vgh,
    s_vgl,
    ds_lin,
    dz_lin,
    u,
    r,
    t,
    qk_scale,
    sm_scale,
    L,
    H,
    NQ,
    NK,
    D: tl.constexpr,
    DP: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    HAS_LINEAR: tl.constexpr,
    COMPLEMENT: tl.constexpr,
    DIRECT: tl.constexpr,
    FEATURE: tl.constexpr,
    EVEN: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    # Key blocks run longest list first (``order``), so a popular block does not start last.
    i_flat = tl.load(order + tl.program_id(0))
    i_bh, i_k = i_flat // NK, i_flat % NK
    i_bh64 = i_bh.to(tl.int64)
    o_t = i_k * BK + tl.arange(0, BK)
    o_r = tl.arange(0, BQ)
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    p_q = head_base(q, i_bh, H, s_qb, s_qh)
    p_do = head_base(do, i_bh, H, s_db, s_dh)
    p_index = index + i_flat.to(tl.int64) * NQ
    # [BK, DP] resident
    b_k = load_rows(head_base(k, i_bh, H, s_kb, s_kh), o_t, s_kl, o_d, L, D, EVEN)
    b_v = load_rows(head_base(v, i_bh, H, s_vb, s_vh), o_t, s_vl, o_d, L, D, EVEN)
    if HAS_LINEAR:
        b_phik = phi_rows(b_k, o_t, L, m_d, FEATURE, EVEN)
    # [BK, DP]
    b_dk = tl.zeros([BK, DP], dtype=tl.float32)
    b_dv = tl.zeros([BK, DP], dtype=tl.float32)
    b_dphi = tl.zeros([BK, DP], dtype=tl.float32)
    p_u, p_r, p_t = u + i_bh64 * L * D, r + i_bh64 * L, t + i_bh64 * L
    n_sel = tl.load(count + i_flat)
    for c in tl.range(0, n_sel):
        o_q = tl.load(p_index + c) * BQ + o_r
        m_q = o_q < L
        # [BQ, DP]
        b_q = load_rows(p_q, o_q, s_ql, o_d, L, D, EVEN)
        b_do = load_rows(p_do, o_q, s_dl, o_d, L, D, EVEN).to(b_q.dtype)
        # Padded query rows get LSE +inf, so P is 0 there.
        b_lse = tl.load(lse + i_bh64 * L + o_q, mask=m_q, other=float("inf")) * LOG2E
        b_delta = tl.load(delta + i_bh64 * L + o_q, mask=m_q, other=0.0)
        # [BK, BQ] transposed scores and probabilities
        b_pt = tl.exp2(dot(b_k, tl.trans(b_q), IS_INTERPRET) * qk_scale - b_lse[None, :])
        b_dv += dot(b_pt.to(b_do.dtype), b_do, IS_INTERPRET)
        b_dst = b_pt * (dot(b_v, tl.trans(b_do), IS_INTERPRET) - b_delta[None, :])
        b_dk += dot(b_dst.to(b_q.dtype), b_q, IS_INTERPRET)
        if COMPLEMENT and not DIRECT:
            # this pair's share is subtracted from the whole state's
            b_gphi, b_gv = complement_grad_k(
                b_phik, b_v, b_q, o_q, p_u, p_r, p_t, o_d, L, D, FEATURE, EVEN, IS_INTERPRET
            )
            b_dphi -= b_gphi
            b_dv -= b_gv
    if DIRECT:
        # the query blocks that left this key block out (``index`` lists them after the n_sel that selected it)
        for c in tl.range(n_sel, NQ):
            o_q = tl.load(p_index + c) * BQ + o_r
            b_q = load_rows(p_q, o_q, s_ql, o_d, L, D, EVEN)
            b_gphi, b_gv = complement_grad_k(
                b_phik, b_v, b_q, o_q, p_u, p_r, p_t, o_d, L, D, FEATURE, EVEN, IS_INTERPRET
            )
            b_dphi += b_gphi
            b_dv += b_gv
    b_dk *= sm_scale
    if HAS_LINEAR:
        if not DIRECT:
            # Every key's share of S and z: dphi(k) += v dS^T + dz, dv += phi(k) dS.
            # [DP, DP] bf16
            b_ds = tl.load(ds_lin + i_bh64 * DP * DP + o_d[:, None] * DP + o_d[None, :])
            b_dphi += dot(b_v.to(b_ds.dtype), tl.trans(b_ds), IS_INTERPRET)
            b_dphi += tl.load(dz_lin + i_bh64 * DP + o_d)[None, :]
            b_dv += dot(b_phik.to(b_ds.dtype), b_ds, IS_INTERPRET)
        b_dk += feature_map_vjp(b_k.to(tl.float32), b_phik, b_dphi, FEATURE)
    m_o = (o_t < L)[:, None] & m_d[None, :]
    tl.store(tile_ptrs(head_base(dk, i_bh, H, s_kgb, s_kgh), o_t, s_kgl, o_d), b_dk.to(dk.dtype.element_ty), mask=m_o)
    tl.store(tile_ptrs(head_base(dv, i_bh, H, s_vgb, s_vgh), o_t, s_vgl, o_d), b_dv.to(dv.dtype.element_ty), mask=m_o)


def key_block_queries(lut: torch.Tensor, num_key_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Invert the look-up table on the device (torch ops only: no host sync, no data-dependent shape).

    Args:
        lut: [B, H, NQ, S] int32 selected key blocks per query block.
        num_key_blocks: NK.
    Returns:
        index: [B*H*NK, NQ] int32; row ``b*H*NK + h*NK + j`` starts with the query blocks that selected key block j,
            ascending (a stable sort of the selection mask), then the others.
        count: [B*H*NK] int32, how many of ``index``'s entries are real.
        order: [B*H*NK] int32, the rows by ``count``, largest first (ties by row), the dK/dV programs' order.
    """
    # [B*H*NK, NQ], contiguous: sort keeps its input's strides, and the kernel reads rows of NQ
    mask = lut_to_mask(lut, num_key_blocks).transpose(-1, -2).flatten(0, 2).contiguous()
    count = mask.sum(dim=-1, dtype=torch.int32)
    index = torch.sort(mask.to(torch.uint8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    order = torch.sort(count, descending=True, stable=True).indices.to(torch.int32)
    return index, count, order


def _launch(kernel: str, head_dim: int, complement: bool, num_warps: int | None, num_stages: int | None):
    kind = "wide" if padded_head_dim(head_dim) > 128 else "complement" if complement else "plain"
    warps, stages = LAUNCH[kernel][kind]
    return {"num_warps": num_warps or warps, "num_stages": num_stages or stages}


def sparse_attn_train_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    block_q: int,
    block_k: int,
    sm_scale: float,
    out: torch.Tensor,
    *,
    linear: LinearState | None = None,
    bias: torch.Tensor | None = None,
    feature_map: str = "softmax",
    complement: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Launch the forward; writes ``out`` = o_s + ``proj_l(o_l)`` (the parts given) and returns the LSE.

    Args:
        q, k, v: [B, H, L, D] views in the compute dtype with unit stride on D.
        lut: [B, H, NQ, S] int32, ascending.
        out: [B, H, L, D] view of the output (any float dtype, unit stride on D).
        linear: ``linear_attn_train.linear_state`` of this call, to add ``o_l W^T``, or None.
        bias: [D] fp32 added to every row, or None.
        complement: scope "complement" (the selected blocks' share is removed from the linear state, or the
            unselected blocks summed directly when fewer: ``linear_attn_train.sums_unselected``).
    Returns:
        lse: [B*H, L] fp32, natural log of the sum of exp(sm_scale * q.k) over each row's selected keys.
    """
    B, H, L, D = q.shape
    DP, NQ, NK = padded_head_dim(D), triton.cdiv(L, block_q), triton.cdiv(L, block_k)
    lut = lut.contiguous()
    direct = complement and sums_unselected(lut.shape[-1], NK)
    rest = unselected_blocks(lut, NK) if direct else lut
    lse = torch.empty(B * H, L, device=q.device, dtype=torch.float32)
    kw, z, weight = (linear.kw, linear.z, linear.w) if linear is not None else (lse, lse, lse)
    sla_train_fwd_kernel[(NQ, B * H)](
        q,
        *q.stride()[:3],
        k,
        *k.stride()[:3],
        v,
        *v.stride()[:3],
        lut,
        rest,
        lse,
        out,
        *out.stride()[:3],
        kw,
        z,
        weight,
        lse if bias is None else bias,
        sm_scale * LOG2E.value,
        L,
        H,
        NQ,
        lut.shape[-1],
        rest.shape[-1],
        D=D,
        DP=DP,
        BQ=block_q,
        BK=block_k,
        HAS_LINEAR=linear is not None,
        HAS_BIAS=bias is not None,
        COMPLEMENT=complement,
        DIRECT=direct,
        FEATURE=FEATURE_MAP_IDS[feature_map],
        EVEN=even_tiles(L, block_q, block_k, D),
        IS_INTERPRET=IS_INTERPRET,
        **_launch("fwd", D, complement, num_warps, num_stages),
    )
    return lse


def sparse_attn_train_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    lut: torch.Tensor,
    block_q: int,
    block_k: int,
    sm_scale: float,
    *,
    linear: LinearGrads | None = None,
    bias: torch.Tensor | None = None,
    feature_map: str = "softmax",
    complement: bool = False,
    launch: dict[str, tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: dQ, then dK and dV (which read the ``delta`` of the dQ kernel or of ``linear``).

    Args:
        q, k, v, lut, block_q, block_k, sm_scale: as the forward; out, lse: the forward's.
        d_out: [B, H, L, D] dLoss/dout (any float dtype, unit stride on D).
        linear: the linear branch's query-side gradients (``linear_attn_bwd_q``), or None without the branch.
        bias: the forward's bias [D] fp32 when it ran without the linear branch (scope "complement", every block
            selected), else None.
        launch: {"dq": (num_warps, num_stages), "dkv": (...)} overriding ``LAUNCH``.
    Returns:
        dq, dk, dv: [B, H, L, D] in the compute dtype, strided like q, k, v.
    """
    B, H, L, D = q.shape
    DP, NQ, NK = padded_head_dim(D), triton.cdiv(L, block_q), triton.cdiv(L, block_k)
    lut = lut.contiguous()
    launch = launch or {}
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    rows = (linear.u, linear.r, linear.t) if complement else (lse, lse, lse)
    # scope "complement" summed over the unselected blocks: the whole state's terms are absent, delta is the dQ
    # kernel's
    rest = linear.unselected if complement else None
    direct = rest is not None
    if linear is not None and not direct:
        delta, dq_lin, ds, dz = linear.delta, linear.dq, linear.ds, linear.dz
    else:
        delta = torch.empty_like(lse)
        dq_lin = ds = dz = lse
    common = {
        "D": D,
        "DP": DP,
        "BQ": block_q,
        "BK": block_k,
        "HAS_LINEAR": linear is not None,
        "COMPLEMENT": complement,
        "DIRECT": direct,
        "FEATURE": FEATURE_MAP_IDS[feature_map],
        "EVEN": even_tiles(L, block_q, block_k, D),
        "IS_INTERPRET": IS_INTERPRET,
    }
    qkv_do = (q, *q.stride()[:3], k, *k.stride()[:3], v, *v.stride()[:3], d_out, *d_out.stride()[:3])
    sla_train_bwd_dq_kernel[(NQ, B * H)](
        *qkv_do,
        out,
        *out.stride()[:3],
        lse if bias is None else bias,
        lut,
        rest if direct else lut,
        lse,
        delta,
        dq,
        *dq.stride()[:3],
        dq_lin,
        *rows,
        sm_scale * LOG2E.value,
        sm_scale,
        L,
        H,
        NQ,
        lut.shape[-1],
        rest.shape[-1] if direct else 0,
        HAS_BIAS=bias is not None,
        **common,
        **_launch("dq", D, complement, *launch.get("dq", (None, None))),
    )
    index, count, order = key_block_queries(lut, NK)
    sla_train_bwd_dkv_kernel[(B * H * NK,)](
        *qkv_do,
        lse,
        delta,
        index,
        count,
        order,
        dk,
        *dk.stride()[:3],
        dv,
        *dv.stride()[:3],
        ds,
        dz,
        *rows,
        sm_scale * LOG2E.value,
        sm_scale,
        L,
        H,
        NQ,
        NK,
        **common,
        **_launch("dkv", D, complement, *launch.get("dkv", (None, None))),
    )
    return dq, dk, dv
