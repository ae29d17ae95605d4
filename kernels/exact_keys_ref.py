"""Exact keys: extra keys every query attends exactly, joined to the sparse softmax through log-sum-exps.

Shape letters: B batch, H heads, L queries, T extra keys, D head dim. A *partial* is softmax attention over one set
of keys, kept as its normalized output and the natural-log log-sum-exp of its scaled scores. Two partials over
disjoint key sets merge into the softmax over their union:
``o = (e^lse_a o_a + e^lse_b o_b) / (e^lse_a + e^lse_b)``.
"""

import torch

from sagesla.kernels.blocks_ref import at_least_fp32

# Bytes of one [L_chunk, T] score buffer over all heads.
_CHUNK_BYTES = 1 << 28


def _safe_shift(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with -inf (a row without keys) replaced by 0, so subtracting it gives exp(-inf) = 0, not NaN."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def exact_partials(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over the extra keys alone, in chunks of queries.

    Masked keys take no part, whatever their values (no ``0 * NaN``). A NaN / Inf in an attended key or value
    gives NaN in the rows it reaches.

    Args:
        q: [B, H, L, D]; k, v: [B, H, T, D] extra keys and values (T may be 0).
        key_mask: [B, T] bool (True = attend) or None (all).
        sm_scale: softmax scale.
    Returns:
        o: [B, H, L, D] fp32, normalized (0 in rows without a valid key); lse: [B, H, L] fp32, natural log of
        ``sum_t exp(sm_scale q.k_t)`` (-inf in rows without a valid key). Float64 inputs give float64.
    """
    q, k, v = at_least_fp32(q), at_least_fp32(k), at_least_fp32(v)
    batch, heads, length, _ = q.shape
    o = q.new_zeros(batch, heads, length, v.shape[-1])
    lse = q.new_full((batch, heads, length), float("-inf"))
    if k.shape[-2] == 0:
        return o, lse
    masked = None if key_mask is None else ~key_mask[:, None, None, :]
    if masked is not None:
        v = v.masked_fill(masked.transpose(-1, -2), 0.0)
    rows = max(1, _CHUNK_BYTES // (batch * heads * k.shape[-2] * q.element_size()))
    for start in range(0, length, rows):
        chunk = slice(start, start + rows)
        scores = (q[:, :, chunk] @ k.transpose(-1, -2)) * sm_scale
        if masked is not None:
            scores = scores.masked_fill(masked, float("-inf"))
        chunk_lse = torch.logsumexp(scores, dim=-1)
        lse[:, :, chunk] = chunk_lse
        o[:, :, chunk] = torch.exp(scores - _safe_shift(chunk_lse)[..., None]) @ v
    return o, lse


def merge_partials(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """The softmax over the union of two disjoint key sets, from their partials.

    Args:
        o_a, o_b: [..., L, D] normalized partial outputs; lse_a, lse_b: [..., L] their natural-log log-sum-exps.
    Returns:
        o: [..., L, D]. A side with lse -inf (no keys) contributes nothing; both -inf gives 0; NaN propagates.
    """
    shift = _safe_shift(torch.maximum(lse_a, lse_b))
    w_a, w_b = torch.exp(lse_a - shift), torch.exp(lse_b - shift)
    total = w_a + w_b
    # both sides empty: 0 / 1 = 0 rather than 0 / 0
    total = total.masked_fill(total == 0, 1.0)
    return o_a * (w_a / total)[..., None] + o_b * (w_b / total)[..., None]
