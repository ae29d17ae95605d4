"""The trainable SLA's linear branch in Triton; twin of ``linear_attn_ref.linear_attn_ref`` (with its autograd).

Per query row: ``num = phi(q) S - cn``, ``den = 1e-5 + phi(q) . z - cd``, ``o_l = num / den`` and
``proj_l(o_l) = o_l W^T + b``, with ``S = sum phi(k)^T v`` [DP, DP] and ``z = sum phi(k)`` [DP] per head over every
token. Scope "all" has ``cn = cd = 0``. Scope "complement" removes the key blocks selected for the row's query block:
``cn = sum_j A_j v_j`` and ``cd = rowsum(sum_j A_j)`` with ``A_j = phi(q) phi(k_j)^T`` [BQ, BK], the same
block-sparse walk as the attention (``complement_step``), so no per-block D x D state is ever stored.
That subtraction loses the remainder to rounding when the selected blocks carry most of the state, so when fewer
blocks are left out than selected (``sums_unselected``) the kernels instead sum ``num = sum_j A_j v_j`` and
``den = 1e-5 + rowsum(sum_j A_j)`` directly over the unselected blocks (``unselected_blocks``; flag ``DIRECT``),
which also walks fewer blocks.

The jit helpers here are shared with ``sparse_attn_train`` (forward epilogue, backward loops); the kernel is the
query side of the branch's backward; ``linear_state`` prepares the state the training kernels read. Derivation:
docs/math.md, "Backward".
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sagesla.kernels._triton_utils import (
    DENOM_EPS,
    FEATURE_MAP_IDS,
    IS_INTERPRET,
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


@triton.jit
def phi_rows(b_x, o_t, L, m_d, FEATURE: tl.constexpr, EVEN: tl.constexpr):
    """phi of a tile [N, DP] of rows ``o_t`` (fp32); rows >= L (tail padding) come out 0."""
    b_phi = feature_map(b_x.to(tl.float32), m_d, FEATURE)
    if not EVEN:
        b_phi = tl.where((o_t < L)[:, None], b_phi, 0.0)
    return b_phi


@triton.jit
def complement_step(
    b_phiq,
    b_k,
    b_v,
    o_t,
    L,
    m_d,
    b_cn,
    b_cd,
    FEATURE: tl.constexpr,
    DIRECT: tl.constexpr,
    EVEN: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    """Add one walked key block's share of the linear state: ``A = phi(q) phi(k)^T``, cn += A v, cd += rowsum A.

    b_phiq [BQ, DP] fp32; b_k, b_v [BK, DP] in the compute dtype; b_cn [BQ, DP], b_cd [BQ] fp32.
    """
    b_phik = phi_rows(b_k, o_t, L, m_d, FEATURE, EVEN)
    # [BQ, BK]
    b_a = dot(b_phiq.to(b_v.dtype), tl.trans(b_phik.to(b_v.dtype)), IS_INTERPRET)
    b_ar = b_a.to(b_v.dtype)
    b_cn += dot(b_ar, b_v, IS_INTERPRET)
    if DIRECT:
        # A as rounded for the product, so o_l = cn / den is a weighted mean of v and the backward's v - o_l (small
        # where few keys are left) keeps its digits
        b_cd += tl.sum(b_ar.to(tl.float32), axis=1)
    else:
        b_cd += tl.sum(b_a, axis=1)
    return b_cn, b_cd


@triton.jit
def complement_sums(
    b_phiq,
    p_lut,
    S,
    p_k,
    s_kl,
    p_v,
    s_vl,
    o_d,
    L,
    D: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    DP: tl.constexpr,
    FEATURE: tl.constexpr,
    DIRECT: tl.constexpr,
    EVEN: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    """cn [BQ, DP] and cd [BQ] over the S key blocks listed at ``p_lut`` (scope "complement")."""
    m_d = o_d < D
    b_cn = tl.zeros([BQ, DP], dtype=tl.float32)
    b_cd = tl.zeros([BQ], dtype=tl.float32)
    for s in tl.range(0, S):
        o_t = tl.load(p_lut + s) * BK + tl.arange(0, BK)
        b_k = load_rows(p_k, o_t, s_kl, o_d, L, D, EVEN)
        b_v = load_rows(p_v, o_t, s_vl, o_d, L, D, EVEN)
        b_cn, b_cd = complement_step(b_phiq, b_k, b_v, o_t, L, m_d, b_cn, b_cd, FEATURE, DIRECT, EVEN, IS_INTERPRET)
    return b_cn, b_cd


@triton.jit
def linear_rows(
    b_phiq,
    p_kw,
    p_z,
    w,
    o_d,
    b_cn,
    b_cd,
    DP: tl.constexpr,
    COMPLEMENT: tl.constexpr,
    DIRECT: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    """``y = o_l W^T`` [N, DP] and ``den`` [N] (fp32) for rows with phi(q) = b_phiq [N, DP] fp32.

    p_kw: the head's ``S W^T`` [DP, DP] bf16; p_z: its z [DP] fp32; w: ``W`` [DP, DP] bf16 (scope "complement").
    b_cn, b_cd: the walked blocks' sums, subtracted from the whole state, or with ``DIRECT`` the branch's own.
    The D x D products run in bf16 with fp32 accumulation (bf16 keeps fp32's range for large states).
    """
    if COMPLEMENT:
        # [DP, DP] W^T
        b_wt = tl.load(w + o_d[None, :] * DP + o_d[:, None])
        b_cnw = dot(b_cn.to(b_wt.dtype), b_wt, IS_INTERPRET)
    if DIRECT:
        b_y = b_cnw
        b_den = DENOM_EPS + b_cd
    else:
        # [DP, DP]
        b_kw = tl.load(p_kw + o_d[:, None] * DP + o_d[None, :])
        b_y = dot(b_phiq.to(b_kw.dtype), b_kw, IS_INTERPRET)
        b_den = DENOM_EPS + tl.sum(b_phiq * tl.load(p_z + o_d)[None, :], axis=1)
        if COMPLEMENT:
            b_y -= b_cnw
            b_den -= b_cd
    return b_y / b_den[:, None], b_den


@triton.jit
def linear_attn_bwd_q_kernel(
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
    kw,
    z,
    w,
    delta,
    dq_lin,
    g_part,
    f_part,
    dz_part,
    db_part,
    u,
    r,
    t,
    L,
    H,
    NQ,
    S,
    CHUNK,
    D: tl.constexpr,
    DP: tl.constexpr,
    BT: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    FEATURE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPLEMENT: tl.constexpr,
    DIRECT: tl.constexpr,
    EVEN: tl.constexpr,
    IS_INTERPRET: tl.constexpr,
):
    """Query side of the linear branch's backward over CHUNK tiles of BT rows of one head.

    With ``y = o_l W^T`` and ``t = -rowsum(dY * y)`` (so ``dden = t / den``): writes the sparse branch's
    ``delta = rowsum(dY * (out - b)) + t`` (= rowsum(dY * o_s)), dq_lin = phi'(q) applied to
    ``dphi = dY (S W^T)^T / den + dden z``, and per-program partial sums G = sum (dY / den)^T phi(q),
    dz = sum phi(q)^T dden, db = sum dY and, for scope "complement", F = sum (dY / den)^T cn with the rows'
    u = dY W, r = 1 / den and t, which the sparse kernels need for the walked blocks' share. ``lut`` lists the S
    walked key blocks per query block; with ``DIRECT`` they are the unselected ones and hold the whole branch, so
    the terms of the whole state (dq_lin, G, dz) are not computed, and delta is left to the dQ kernel.
    """
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh64 = i_bh.to(tl.int64)
    i_part = i_bh64 * tl.num_programs(0) + i_c
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    p_q = head_base(q, i_bh, H, s_qb, s_qh)
    p_k = head_base(k, i_bh, H, s_kb, s_kh)
    p_v = head_base(v, i_bh, H, s_vb, s_vh)
    p_do = head_base(do, i_bh, H, s_db, s_dh)
    p_out = head_base(out, i_bh, H, s_ob, s_oh)
    p_kw = kw + i_bh64 * DP * DP
    p_z = z + i_bh64 * DP
    b_z = tl.load(p_z + o_d)
    # [DP, DP] partial sums
    b_g = tl.zeros([DP, DP], dtype=tl.float32)
    b_f = tl.zeros([DP, DP], dtype=tl.float32)
    b_dz = tl.zeros([DP], dtype=tl.float32)
    b_db = tl.zeros([DP], dtype=tl.float32)
    for i_t in tl.range(i_c * CHUNK, tl.minimum(i_c * CHUNK + CHUNK, tl.cdiv(L, BT))):
        o_q = i_t * BT + tl.arange(0, BT)
        m_o = (o_q < L)[:, None] & m_d[None, :]
        # [BT, DP]
        b_q = load_rows(p_q, o_q, s_ql, o_d, L, D, EVEN).to(tl.float32)
        b_phiq = feature_map(b_q, m_d, FEATURE)
        b_do = load_rows(p_do, o_q, s_dl, o_d, L, D, EVEN).to(tl.float32)
        b_cn = tl.zeros([BT, DP], dtype=tl.float32)
        b_cd = tl.zeros([BT], dtype=tl.float32)
        if COMPLEMENT:
            p_lut = lut + (i_bh64 * NQ + i_t * BT // BQ) * S
            b_cn, b_cd = complement_sums(
                b_phiq, p_lut, S, p_k, s_kl, p_v, s_vl, o_d, L, D, BT, BK, DP, FEATURE, DIRECT, EVEN, IS_INTERPRET
            )
        if DIRECT:
            b_den = DENOM_EPS + b_cd
        else:
            b_y, b_den = linear_rows(b_phiq, p_kw, p_z, w, o_d, b_cn, b_cd, DP, COMPLEMENT, DIRECT, IS_INTERPRET)
        b_rden = 1.0 / b_den
        # [BT, DP] dY / den, in bf16 for the D x D products
        b_dor = (b_do * b_rden[:, None]).to(tl.bfloat16)
        if not DIRECT:
            b_t = -tl.sum(b_do * b_y, axis=1)
            b_out = load_rows(p_out, o_q, s_ol, o_d, L, D, EVEN).to(tl.float32)
            if HAS_BIAS:
                b_out -= tl.load(bias + o_d, mask=m_d, other=0.0)[None, :]
            tl.store(delta + i_bh64 * L + o_q, tl.sum(b_do * b_out, axis=1) + b_t, mask=o_q < L)
            b_kw = tl.load(p_kw + o_d[:, None] * DP + o_d[None, :])
            b_dphi = dot(b_dor, tl.trans(b_kw), IS_INTERPRET) + (b_t * b_rden)[:, None] * b_z[None, :]
            p_dq = tile_ptrs(dq_lin + i_bh64 * L * D, o_q, D, o_d)
            tl.store(p_dq, feature_map_vjp(b_q, b_phiq, b_dphi, FEATURE), mask=m_o)
            b_g += dot(tl.trans(b_dor), b_phiq.to(tl.bfloat16), IS_INTERPRET)
            b_dz += tl.sum(b_phiq * (b_t * b_rden)[:, None], axis=0)
        b_db += tl.sum(b_do, axis=0)
        if COMPLEMENT:
            b_f += dot(tl.trans(b_dor), b_cn.to(tl.bfloat16), IS_INTERPRET)
            b_u = dot(b_do.to(tl.bfloat16), tl.load(w + o_d[:, None] * DP + o_d[None, :]), IS_INTERPRET)
            b_u = b_u.to(u.dtype.element_ty)
            tl.store(tile_ptrs(u + i_bh64 * L * D, o_q, D, o_d), b_u, mask=m_o)
            if DIRECT:
                # t = -rowsum(u * o_l) from the stored u, so the sparse kernels' u v^T + t = u (v - o_l) cancels
                # exactly where a key's v is the mean o_l (a single key left)
                b_t = -tl.sum(b_u.to(tl.float32) * b_cn * b_rden[:, None], axis=1)
            tl.store(r + i_bh64 * L + o_q, b_rden, mask=o_q < L)
            tl.store(t + i_bh64 * L + o_q, b_t, mask=o_q < L)
    if not DIRECT:
        tl.store(g_part + i_part * DP * DP + o_d[:, None] * DP + o_d[None, :], b_g)
        tl.store(dz_part + i_part * DP + o_d, b_dz)
    tl.store(db_part + i_part * DP + o_d, b_db)
    if COMPLEMENT:
        tl.store(f_part + i_part * DP * DP + o_d[:, None] * DP + o_d[None, :], b_f)


class LinearState(NamedTuple):
    """The linear branch's tensors for the kernels, per head, zero-padded from D to DP.

    kv: [B*H, D, D] fp32, S (unpadded).     kw: [B*H, DP, DP] bf16, ``S W^T`` (proj_l folded into the state).
    z: [B*H, DP] fp32.                       w: [DP, DP] bf16, ``proj_l.weight``.
    """

    kv: torch.Tensor
    kw: torch.Tensor
    z: torch.Tensor
    w: torch.Tensor


def sums_unselected(selected: int, num_key_blocks: int) -> bool:
    """Whether scope "complement" sums the unselected key blocks directly (fewer of them than selected ones) rather
    than subtracting the selected blocks' share from the whole state: the subtraction's rounding error scales with
    the selected share, so it suits only a remainder at least as large."""
    return num_key_blocks - selected < selected


def unselected_blocks(lut: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
    """[B, H, NQ, S] int32 ascending -> [B, H, NQ, NK - S] int32 ascending: the key blocks each query block leaves
    out (torch ops on the device: no host sync)."""
    mask = lut_to_mask(lut, num_key_blocks).to(torch.uint8)
    rest = torch.sort(mask, dim=-1, stable=True).indices[..., : num_key_blocks - lut.shape[-1]]
    return rest.to(torch.int32).contiguous()


def folded_state(kv: torch.Tensor, ksum: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernels' linear operands: ``S W^T`` [..., DP, DP] bf16 and ``z`` [..., DP] fp32, zero-padded to DP
    (the training kernels' state; the inference forward gets them from ``kv_stats.inference_stats``' finishing launch).

    kv: [..., D, D] = S, ksum: [..., D] = z (``kv_stats``), weight: ``proj_l.weight`` [D, D].
    """
    extra = padded_head_dim(kv.shape[-1]) - kv.shape[-1]
    kvw = (kv.float() @ weight.float().t()).to(torch.bfloat16)
    z = ksum.float()
    if extra:
        kvw, z = F.pad(kvw, (0, extra, 0, extra)), F.pad(z, (0, extra))
    return kvw.contiguous(), z.contiguous()


def linear_state(kv: torch.Tensor, ksum: torch.Tensor, weight: torch.Tensor) -> LinearState:
    """From S = kv [B, H, D, D], z = ksum [B, H, D] (``kv_stats``) and ``proj_l.weight`` [D, D]."""
    extra = padded_head_dim(kv.shape[-1]) - kv.shape[-1]
    kv = kv.float().flatten(0, 1)
    kvw, z = folded_state(kv, ksum.flatten(0, 1), weight)
    return LinearState(kv, kvw, z, F.pad(weight.float(), (0, extra, 0, extra)).to(torch.bfloat16).contiguous())


class LinearGrads(NamedTuple):
    """The linear branch's gradients from its query side, and the sparse branch's delta.

    delta: [B*H, L] fp32, rowsum(dY * o_s).               dq: [B*H, L, D] fp32, the whole state's share of dq.
    ds: [B*H, DP, DP] bf16, dLoss/dS (zero-padded).       dz: [B*H, DP] fp32, dLoss/dz.
    dweight: [D, D] fp32; dbias: [D] fp32.
    u: [B*H, L, D] in the compute dtype, ``dY W``; r, t: [B*H, L] fp32, ``1 / den`` and ``-rowsum(dY * y)``:
    the per-row terms of the walked blocks' share (scope "complement"; None for "all").
    unselected: [B, H, NQ, NK - S] int32 when scope "complement" sums the unselected blocks directly
    (``sums_unselected``; delta is then left to the dQ kernel, and dq, ds and dz are None: the whole state takes no
    part), else None.
    """

    delta: torch.Tensor | None
    dq: torch.Tensor | None
    ds: torch.Tensor | None
    dz: torch.Tensor | None
    dweight: torch.Tensor
    dbias: torch.Tensor
    u: torch.Tensor | None
    r: torch.Tensor | None
    t: torch.Tensor | None
    unselected: torch.Tensor | None


def linear_attn_bwd_q(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    d_out: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None,
    lut: torch.Tensor,
    state: LinearState,
    weight: torch.Tensor,
    feature_map: str,
    complement: bool,
    block_q: int,
    block_k: int,
    *,
    programs: int = 528,
    rows: int = 32,
    num_warps: int = 8,
    num_stages: int = 1,
) -> LinearGrads:
    """Launch the query side of the linear branch's backward and reduce its partial sums (deterministically).

    Args:
        q, k, v: [B, H, L, D] views in the compute dtype with unit stride on D; d_out: [B, H, L, D] dLoss/dOutput
            and out: the forward's output (any float dtype, unit stride on D); bias: ``proj_l.bias`` [D] or None.
        lut: [B, H, NQ, S] int32 (read for scope "complement", which walks it or, with ``sums_unselected``, the
            blocks it leaves out).
        state: ``linear_state`` of this call; weight: ``proj_l.weight`` [D, D].
        programs, rows, num_warps, num_stages: launch shape (programs in all, as chunks of row tiles x heads;
            rows per tile, at most ``block_q``).
    """
    B, H, L, D = q.shape
    DP, rows = padded_head_dim(D), min(rows, block_q)
    NK = triton.cdiv(L, block_k)
    tiles = triton.cdiv(L, rows)
    chunk = triton.cdiv(tiles, max(1, min(tiles, triton.cdiv(programs, B * H))))
    parts = triton.cdiv(tiles, chunk)
    direct = complement and sums_unselected(lut.shape[-1], NK)
    walk = unselected_blocks(lut, NK) if direct else lut.contiguous()
    f32 = {"device": q.device, "dtype": torch.float32}
    db_part = torch.empty(B * H, parts, DP, **f32)
    delta = db_part if direct else torch.empty(B * H, L, **f32)
    dq = db_part if direct else torch.empty(B * H, L, D, **f32)
    g_part = db_part if direct else torch.empty(B * H, parts, DP, DP, **f32)
    f_part = torch.empty(B * H, parts, DP, DP, **f32) if complement else g_part
    dz_part = db_part if direct else torch.empty(B * H, parts, DP, **f32)
    u = torch.empty(B * H, L, D, device=q.device, dtype=q.dtype) if complement else None
    r = torch.empty(B * H, L, **f32) if complement else None
    t = torch.empty(B * H, L, **f32) if complement else None
    linear_attn_bwd_q_kernel[(parts, B * H)](
        q,
        *q.stride()[:3],
        k,
        *k.stride()[:3],
        v,
        *v.stride()[:3],
        d_out,
        *d_out.stride()[:3],
        out,
        *out.stride()[:3],
        db_part if bias is None else bias.float().contiguous(),
        walk,
        state.kw,
        state.z,
        state.w,
        delta,
        dq,
        g_part,
        f_part,
        dz_part,
        db_part,
        db_part if u is None else u,
        db_part if r is None else r,
        db_part if t is None else t,
        L,
        H,
        triton.cdiv(L, block_q),
        walk.shape[-1],
        chunk,
        D=D,
        DP=DP,
        BT=rows,
        BQ=block_q,
        BK=block_k,
        FEATURE=FEATURE_MAP_IDS[feature_map],
        HAS_BIAS=bias is not None,
        COMPLEMENT=complement,
        DIRECT=direct,
        EVEN=even_tiles(L, block_q, block_k, D),
        IS_INTERPRET=IS_INTERPRET,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    dbias = db_part.sum(dim=(0, 1))[:D]
    if direct:
        dweight = f_part.sum(dim=(0, 1))[:D, :D]
        return LinearGrads(None, None, None, None, dweight, dbias, u, r, t, walk)
    g = g_part.sum(dim=1)[:, :D, :D]
    dweight = (g @ state.kv).sum(dim=0)
    if complement:
        dweight -= f_part.sum(dim=(0, 1))[:D, :D]
    ds = F.pad(g.transpose(-1, -2) @ weight.float(), (0, DP - D, 0, DP - D)).to(torch.bfloat16).contiguous()
    return LinearGrads(delta, dq, ds, dz_part.sum(dim=1), dweight, dbias, u, r, t, None)
