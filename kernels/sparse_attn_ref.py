"""Reference block-sparse attention: each query block attends to the keys of its selected key blocks.

Scores are in base 2 (the softmax scale times log2(e) is folded in), so ``p = exp2(s - rowmax)``; on request the
references also return each row's log-sum-exp, ``ln(2) * (rowmax + log2(rowsum))``, the natural log of
``sum exp`` of the true scaled scores (``exact_keys_ref.merge_partials`` joins it with other keys).
Memory is bounded by gathering only the selected blocks, never an L x L buffer, and by walking the
B*H heads in chunks.
"""

from collections.abc import Callable, Iterator

import torch

from sagesla.kernels.blocks_ref import at_least_fp32, to_blocks
from sagesla.kernels.constants import FP8_DTYPE, FP8_MAX, LN2, LOG2E

# Bytes of fp32 score temporaries one chunk of heads may hold.
_CHUNK_BYTES = 1 << 28


def _head_chunks(heads: int, per_head_bytes: int) -> Iterator[slice]:
    step = max(1, _CHUNK_BYTES // max(per_head_bytes, 1))
    for start in range(0, heads, step):
        yield slice(start, min(start + step, heads))


def _gather_blocks(blocks: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """blocks [N, NK, BK, *], lut [N, NQ, S] -> [N, NQ, S * BK, *]."""
    rows = torch.arange(blocks.shape[0], device=blocks.device)[:, None, None]
    return blocks[rows, lut.long()].flatten(2, 3)


def _key_valid(lut: torch.Tensor, block_k: int, length: int) -> torch.Tensor:
    """[N, NQ, S] -> [N, NQ, 1, S * BK] bool: which gathered keys are real tokens (not tail padding)."""
    keys = lut.long()[..., None] * block_k + torch.arange(block_k, device=lut.device)
    return (keys < length).flatten(-2)[..., None, :]


def _softmax_pv(
    scores: torch.Tensor, valid: torch.Tensor, v_sel: torch.Tensor, round_p: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked base-2 softmax of scores [N, NQ, BQ, K] times v_sel [N, NQ, K, D]; P goes through ``round_p``.

    Returns (o [N, NQ, BQ, D], base-2 log-sum-exp [N, NQ, BQ] of the scores, from the unrounded P).
    """
    scores = scores.masked_fill(~valid, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    p = torch.exp2(scores - row_max)
    row_sum = p.sum(dim=-1, keepdim=True)
    return (round_p(p) @ v_sel) / row_sum, (row_max + torch.log2(row_sum)).squeeze(-1)


def _attend(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    lut: torch.Tensor,
    length: int,
    scores_fn: Callable[[slice, torch.Tensor, torch.Tensor], torch.Tensor],
    round_p: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared walk over head chunks. *_blocks are [B*H, N, BLK, D] fp32; returns (o [B*H, NQ*BQ, D] fp32,
    base-2 log-sum-exp [B*H, NQ*BQ] fp32)."""
    heads, nq, bq, _ = q_blocks.shape
    block_k = k_blocks.shape[2]
    out = q_blocks.new_empty(q_blocks.shape)
    lse = q_blocks.new_empty(q_blocks.shape[:-1])
    for c in _head_chunks(heads, nq * bq * lut.shape[-1] * block_k * 4 * 3):
        k_sel = _gather_blocks(k_blocks[c], lut[c])
        scores = scores_fn(c, q_blocks[c] @ k_sel.transpose(-1, -2), lut[c])
        valid = _key_valid(lut[c], block_k, length)
        out[c], lse[c] = _softmax_pv(scores, valid, _gather_blocks(v_blocks[c], lut[c]), round_p)
    return out.flatten(1, 2), lse.flatten(1, 2)


def _flat_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, L, D] -> [B*H, N, block, D] fp32 (float64 stays float64)."""
    return to_blocks(at_least_fp32(x), block).flatten(0, 1)


def _unflatten(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B*H, NQ*BQ, ...] -> [B, H, L, ...], dropping the padded rows of the tail query block."""
    return x[:, : like.shape[-2]].unflatten(0, like.shape[:2])


def sparse_attn_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    block_q: int,
    block_k: int,
    sm_scale: float,
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Unquantized block-sparse attention (the trainable SLA's sparse branch), fp32 math.

    Args:
        q, k, v: [B, H, L, D] in the compute dtype.
        lut: [B, H, NQ, S] int32 selected key blocks per query block.
        block_q, block_k: BQ, BK.
        sm_scale: softmax scale.
        return_lse: also return the log-sum-exp.
    Returns:
        o_s: [B, H, L, D] fp32; with ``return_lse``, (o_s, lse [B, H, L] fp32, natural log of
        ``sum exp(sm_scale q.k)`` over each row's selected keys).
    """
    scale = sm_scale * LOG2E

    def scores_fn(c: slice, dots: torch.Tensor, lut_c: torch.Tensor) -> torch.Tensor:
        return dots * scale

    o, lse = _attend(
        _flat_blocks(q, block_q),
        _flat_blocks(k, block_k),
        _flat_blocks(v, block_k),
        lut.flatten(0, 1),
        q.shape[-2],
        scores_fn,
        lambda p: p,
    )
    o = _unflatten(o, q)
    return (o, _unflatten(lse, q) * LN2) if return_lse else o


def sparse_attn_quant_ref(
    q_int8: torch.Tensor,
    q_scale: torch.Tensor,
    k_int8: torch.Tensor,
    k_scale: torch.Tensor,
    v: torch.Tensor,
    v_scale: torch.Tensor | None,
    lut: torch.Tensor,
    block_q: int,
    block_k: int,
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Quantized block-sparse attention of SageSLA.

    Scores are ``int8 dot * q_scale * k_scale`` (exact: int8 products of D <= 1024 sum exactly in fp32), already
    in base 2 because ``sm_scale * log2(e)`` was folded into Q. With FP8 V, P is shifted so its row maximum is
    448, rounded to FP8 e4m3 and multiplied with V in fp32; the row sum uses the unrounded P.
    With 16-bit V (``v_scale`` None), P is rounded to V's dtype instead.

    Args:
        q_int8: [B, H, L, D] int8; q_scale: [B, H, NQ] fp32.
        k_int8: [B, H, L, D] int8; k_scale: [B, H, NK] fp32.
        v: [B, H, L, D] float8_e4m3fn with v_scale [B, H, D] fp32, or fp16 / bf16 with v_scale None.
        lut: [B, H, NQ, S] int32.
        block_q, block_k: BQ, BK.
        return_lse: also return the log-sum-exp.
    Returns:
        o_s: [B, H, L, D] fp32; with ``return_lse``, (o_s, lse [B, H, L] fp32): ``ln(2)`` times the base-2
        log-sum-exp of the scores used (``int8 dot * q_scale * k_scale``; the row sum of the unrounded P), so the
        natural log-sum-exp of ``sm_scale q.(k - k_mean)`` in the pipeline, where K was smoothed.
    """
    qs = q_scale.flatten(0, 1)
    ks = k_scale.flatten(0, 1)

    def scores_fn(c: slice, dots: torch.Tensor, lut_c: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(lut_c.shape[0], device=lut_c.device)[:, None, None]
        key_scale = ks[c][rows, lut_c.long()].repeat_interleave(block_k, dim=-1)
        return dots * (qs[c][..., None, None] * key_scale[:, :, None, :])

    if v.dtype == FP8_DTYPE:
        if v_scale is None:
            raise ValueError("sparse_attn_quant_ref: FP8 `v` needs `v_scale` [B, H, D]")

        def round_p(p: torch.Tensor) -> torch.Tensor:
            return (p * FP8_MAX).to(FP8_DTYPE).float() / FP8_MAX

    else:

        def round_p(p: torch.Tensor) -> torch.Tensor:
            return p.to(v.dtype).float()

    o, lse = _attend(
        _flat_blocks(q_int8, block_q),
        _flat_blocks(k_int8, block_k),
        _flat_blocks(v, block_k),
        lut.flatten(0, 1),
        q_int8.shape[-2],
        scores_fn,
        round_p,
    )
    o = _unflatten(o, q_int8)
    if v_scale is not None:
        o = o * v_scale[:, :, None, :]
    return (o, _unflatten(lse, q_int8) * LN2) if return_lse else o
