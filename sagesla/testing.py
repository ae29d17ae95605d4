"""Test and benchmark helpers: a dense masked attention oracle and one comparison helper."""

import torch

from sagesla import metrics


def assert_close(name: str, ref: torch.Tensor, tri: torch.Tensor, tol: float) -> None:
    """Fail unless ``rel_l1(tri, ref) <= tol``; NaN anywhere in ``tri`` or ``ref`` fails too."""
    if ref.shape != tri.shape:
        raise AssertionError(f"{name}: shape {tuple(tri.shape)} != reference {tuple(ref.shape)}")
    for label, x in (("result", tri), ("reference", ref)):
        if x.is_floating_point() and torch.isnan(x).any():
            raise AssertionError(f"{name}: {label} holds {int(torch.isnan(x).sum())} NaN")
    err = metrics.rel_l1(tri, ref)
    if not err <= tol:
        raise AssertionError(f"{name}: rel-L1 {err:.3e} > {tol:.1e} (cosine {metrics.cosine(tri, ref):.6f})")


def expand_block_mask(block_mask: torch.Tensor, length: int, block_q: int, block_k: int) -> torch.Tensor:
    """[B, H, NQ, NK] bool -> [B, H, L, L] bool token mask."""
    return block_mask.repeat_interleave(block_q, dim=-2)[..., :length, :].repeat_interleave(block_k, dim=-1)[
        ..., :length
    ]


def dense_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    sm_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Dense softmax attention, optionally restricted to ``token_mask`` [B, H, L, L] (True = attend).

    q, k, v: [B, H, L, D]; the math runs in ``dtype`` (float64 for ground truth). Returns [B, H, L, D] in ``dtype``.
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if token_mask is not None:
        scores = scores.masked_fill(~token_mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def sla_dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    block_q: int,
    block_k: int,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    feature_map: str = "softmax",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SLA computed densely: softmax attention masked to ``lut``'s blocks plus ``proj_l`` of the linear branch.

    q, k, v: [B, H, L, D]; lut: [B, H, NQ, S]. One head at a time, so only one [L, L] score matrix is alive.
    Returns [B, H, L, D] in ``dtype``.
    """
    from sagesla.kernels.block_select_ref import lut_to_mask
    from sagesla.kernels.linear_attn_ref import linear_attn_ref

    length = q.shape[-2]
    mask = lut_to_mask(lut, -(-length // block_k))
    heads = [
        dense_masked_attention(
            q[:, h : h + 1],
            k[:, h : h + 1],
            v[:, h : h + 1],
            expand_block_mask(mask[:, h : h + 1], length, block_q, block_k),
            dtype=dtype,
        )
        for h in range(q.shape[1])
    ]
    return torch.cat(heads, dim=1) + linear_attn_ref(q, k, v, feature_map, proj_weight, proj_bias).to(dtype)
