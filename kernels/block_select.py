"""Triton block selection: pooled scores and top-S key blocks per query block, straight into the look-up table.

Twin of ``block_select_ref.select_blocks_ref``. S rounds of arg-max pick the blocks (ties to the lower index);
a prefix sum over the chosen flags writes them in ascending order. No host synchronisation.
"""

import torch
import triton
import triton.language as tl

from sagesla.kernels._triton_utils import padded_head_dim
from sagesla.kernels.block_select_ref import num_selected_blocks

# Rows of query blocks one program ranks; the pooled-score tile is [BQT, NKP] fp32.
_BQT = 16
# Largest NK (padded to a power of two) one program holds; past it the torch ranking runs instead.
MAX_KEY_BLOCKS = 4096


@triton.jit
def select_blocks_kernel(
    q_pool,
    k_pool,
    lut,
    NQ,
    NK,
    S,
    D,
    DP: tl.constexpr,
    BQT: tl.constexpr,
    NKP: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    o_i = i_t * BQT + tl.arange(0, BQT)
    o_j = tl.arange(0, NKP)
    o_d = tl.arange(0, DP)
    m_d = o_d < D
    # [BQT, DP], [NKP, DP]
    b_q = tl.load(
        q_pool + (i_bh.to(tl.int64) * NQ + o_i[:, None]) * D + o_d[None, :],
        mask=(o_i < NQ)[:, None] & m_d[None, :],
        other=0.0,
    )
    b_k = tl.load(
        k_pool + (i_bh.to(tl.int64) * NK + o_j[:, None]) * D + o_d[None, :],
        mask=(o_j < NK)[:, None] & m_d[None, :],
        other=0.0,
    )
    # [BQT, NKP]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    # NaN ranks last; -inf marks padding and blocks already taken.
    b_s = tl.where(b_s == b_s, tl.minimum(tl.maximum(b_s, -3.0e38), 3.0e38), -3.0e38)
    b_s = tl.where((o_j < NK)[None, :], b_s, float("-inf"))
    b_sel = tl.zeros([BQT, NKP], dtype=tl.int32)
    for _ in tl.range(0, S):
        b_hit = o_j[None, :] == tl.argmax(b_s, axis=1)[:, None]
        b_sel = tl.where(b_hit, 1, b_sel)
        b_s = tl.where(b_hit, float("-inf"), b_s)
    b_pos = tl.cumsum(b_sel, axis=1) - 1
    p_lut = lut + (i_bh.to(tl.int64) * NQ + o_i[:, None]) * S + b_pos
    tl.store(p_lut, tl.broadcast_to(o_j[None, :], [BQT, NKP]), mask=(b_sel == 1) & (o_i < NQ)[:, None])


def select_blocks(q_pool: torch.Tensor, k_pool: torch.Tensor, topk: float) -> torch.Tensor:
    """Triton twin of ``select_blocks_ref``.

    Args:
        q_pool: [B, H, NQ, W] fp32, k_pool: [B, H, NK, W] fp32 (W = D, or DP with zero padded columns).
        topk: fraction of key blocks to keep.
    Returns:
        lut: [B, H, NQ, S] int32, ascending.
    """
    B, H, NQ, W = q_pool.shape
    NK = k_pool.shape[2]
    DP = padded_head_dim(W)
    S = num_selected_blocks(topk, NK)
    NKP = max(16, triton.next_power_of_2(NK))
    if NKP > MAX_KEY_BLOCKS:
        raise NotImplementedError(f"select_blocks: {NK} key blocks exceed the kernel's {MAX_KEY_BLOCKS}")
    lut = torch.empty(B, H, NQ, S, device=q_pool.device, dtype=torch.int32)
    select_blocks_kernel[(triton.cdiv(NQ, _BQT), B * H)](
        q_pool.contiguous(),
        k_pool.contiguous(),
        lut,
        NQ,
        NK,
        S,
        W,
        DP=DP,
        BQT=_BQT,
        NKP=NKP,
        num_warps=4,
    )
    return lut
