"""Triton block selection: top-S key blocks per query block from the pooled scores, straight into the look-up table.

Twin of ``block_select_ref.select_blocks_ref``. S rounds of arg-max pick the blocks (ties to the lower index);
a prefix sum over the chosen flags writes them in ascending order. No host synchronisation.
"""

import torch
import triton
import triton.language as tl

from sagesla.kernels.block_select_ref import MAX_KEY_BLOCKS, num_selected_blocks

# Query blocks one program ranks; its pooled-score tile is [BQT, NKP] fp32.
_BQT = 16


@triton.jit
def select_blocks_kernel(
    scores,
    lut,
    NQ,
    NK,
    S,
    BQT: tl.constexpr,
    NKP: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    o_i = i_t * BQT + tl.arange(0, BQT)
    o_j = tl.arange(0, NKP)
    # [BQT, NKP] pooled scores of BQT query blocks
    b_s = tl.load(
        scores + (i_bh.to(tl.int64) * NQ + o_i[:, None]) * NK + o_j[None, :],
        mask=(o_i < NQ)[:, None] & (o_j < NK)[None, :],
        other=float("-inf"),
    )
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

    The pooled scores [B, H, NQ, NK] come from one fp32 matrix product (the reference's own op, so both rank
    identical numbers); the kernel ranks them and writes the look-up table.

    Args:
        q_pool: [B, H, NQ, W] fp32, k_pool: [B, H, NK, W] fp32 (W = D, or DP with zero padded columns).
        topk: fraction of key blocks to keep.
    Returns:
        lut: [B, H, NQ, S] int32, ascending.
    """
    B, H, NQ, _ = q_pool.shape
    NK = k_pool.shape[2]
    S = num_selected_blocks(topk, NK)
    NKP = max(16, triton.next_power_of_2(NK))
    if NKP > MAX_KEY_BLOCKS:
        raise NotImplementedError(f"select_blocks: {NK} key blocks exceed the kernel's {MAX_KEY_BLOCKS}")
    scores = (q_pool @ k_pool.transpose(-1, -2)).contiguous()
    lut = torch.empty(B, H, NQ, S, device=q_pool.device, dtype=torch.int32)
    select_blocks_kernel[(triton.cdiv(NQ, _BQT), B * H)](
        scores, lut, NQ, NK, S, BQT=_BQT, NKP=NKP, num_warps=4 if NKP <= 512 else 8
    )
    return lut
