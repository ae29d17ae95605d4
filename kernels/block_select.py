"""Triton block selection: top-S key blocks per query block from the pooled scores, straight into the look-up table.

Twin of ``block_select_ref.select_blocks_ref``. A bitwise radix search finds each row's S-th largest score in 32
counting rounds, whatever S is; blocks above it are kept, ties at it go to the lowest indices, and a prefix sum
over the kept flags writes them in ascending order. No host synchronisation; the score buffer is bounded.
"""

import torch
import triton
import triton.language as tl

from sagesla.kernels.block_select_ref import MAX_KEY_BLOCKS, num_selected_blocks

# Pooled scores alive at once: 128 MiB holds every head of the Wan2.1-14B shape (B1 H40 L75600, 112 MiB at 64 x 128
# blocks), so the Wan shapes run in one launch; larger batches are ranked a group of heads at a time.
SCORE_BUFFER_BYTES = 128 << 20


@triton.jit
def _order_preserving_int(x):
    """fp32 -> int32 whose signed order is the float order (-0.0 just below +0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


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
    m_j = (o_j < NK)[None, :]
    # [BQT, NKP] pooled scores of BQT query blocks
    b_s = tl.load(
        scores + (i_bh.to(tl.int64) * NQ + o_i[:, None]) * NK + o_j[None, :],
        mask=(o_i < NQ)[:, None] & m_j,
        other=float("-inf"),
    )
    # NaN ranks below every real score, -inf padding below that: S <= NK real blocks always win. -0.0 becomes +0.0:
    # the reference's sort ties them (lowest index first) where their keys would order them.
    b_s = tl.where(b_s == b_s, tl.minimum(tl.maximum(b_s, -3.0e38), 3.0e38), -3.0e38)
    b_s = tl.where(b_s == 0.0, 0.0, b_s)
    b_key = _order_preserving_int(tl.where(m_j, b_s, float("-inf")))
    # T = max{t : #(key >= t) >= S}, decided bit by bit from the top (sign bit first: is T >= 0?). b_n counts the
    # keys at or above the bits decided so far; once every row has exactly S there, those are its S largest
    # whatever the remaining bits, and the search stops (random fp32 scores: after about half the 32 rounds).
    b_t = tl.full([BQT], -2147483648, dtype=tl.int32)
    b_n = tl.sum((b_key >= 0).to(tl.int32), axis=1)
    b_t = tl.where(b_n >= S, 0, b_t)
    b_n = tl.where(b_n >= S, b_n, NKP)
    bit = 30
    while (bit >= 0) & (tl.max(b_n, axis=0) > S):
        b_cand = b_t + (1 << bit)
        b_count = tl.sum((b_key >= b_cand[:, None]).to(tl.int32), axis=1)
        b_t = tl.where(b_count >= S, b_cand, b_t)
        b_n = tl.where(b_count >= S, b_count, b_n)
        bit -= 1
    b_above = b_key > b_t[:, None]
    b_tie = b_key == b_t[:, None]
    b_room = S - tl.sum(b_above.to(tl.int32), axis=1)
    b_sel = b_above | (b_tie & (tl.cumsum(b_tie.to(tl.int32), axis=1) <= b_room[:, None]))
    b_pos = tl.cumsum(b_sel.to(tl.int32), axis=1) - 1
    p_lut = lut + (i_bh.to(tl.int64) * NQ + o_i[:, None]) * S + b_pos
    tl.store(p_lut, tl.broadcast_to(o_j[None, :], [BQT, NKP]), mask=b_sel & (o_i < NQ)[:, None])


def select_blocks(
    q_pool: torch.Tensor, k_pool: torch.Tensor, topk: float, *, score_bytes: int = SCORE_BUFFER_BYTES
) -> torch.Tensor:
    """Triton twin of ``select_blocks_ref``.

    The pooled scores come from fp32 matrix products (the reference's own op, so both rank identical numbers),
    a group of heads at a time so the score buffer stays within ``score_bytes`` (one head at least); the kernel
    ranks them and writes the look-up table. Group sizes depend on shapes only (CUDA-graph safe).

    Args:
        q_pool: [B, H, NQ, W] fp32, k_pool: [B, H, NK, W] fp32 (W = D, or DP with zero padded columns).
        topk: fraction of key blocks to keep.
        score_bytes: the most bytes of scores alive at once.
    Returns:
        lut: [B, H, NQ, S] int32, ascending.
    """
    B, H, NQ, W = q_pool.shape
    NK = k_pool.shape[2]
    S = num_selected_blocks(topk, NK)
    NKP = max(16, triton.next_power_of_2(NK))
    if NKP > MAX_KEY_BLOCKS:
        raise NotImplementedError(f"select_blocks: {NK} key blocks exceed the kernel's {MAX_KEY_BLOCKS}")
    # One row per program on one warp up to 256 key blocks, 2 warps beyond: fastest at the Wan shapes
    # (benchmarks/experiments.md, block selection).
    rows, warps = (1, 1) if NKP <= 256 else (1, 2)
    q_heads, k_heads = q_pool.reshape(B * H, NQ, W), k_pool.reshape(B * H, NK, -1)
    lut = torch.empty(B * H, NQ, S, device=q_pool.device, dtype=torch.int32)
    group = max(1, score_bytes // (NQ * NK * 4))
    for start in range(0, B * H, group):
        heads = slice(start, min(start + group, B * H))
        scores = (q_heads[heads] @ k_heads[heads].transpose(-1, -2)).contiguous()
        select_blocks_kernel[(triton.cdiv(NQ, rows), scores.shape[0])](
            scores, lut[heads], NQ, NK, S, BQT=rows, NKP=NKP, num_warps=warps
        )
    return lut.view(B, H, NQ, S)
