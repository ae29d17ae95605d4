"""Test and benchmark helpers: a dense masked attention oracle, one comparison helper and a tiny Wan model."""

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


# A 2-block diffusers WanTransformer3DModel, 2 heads of 64: a forward on ``wan_inputs()`` (256 tokens) takes 0.02 s
# on 2 CPU cores.
TINY_WAN_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 128,
    "num_layers": 2,
    "qk_norm": "rms_norm_across_heads",
    "cross_attn_norm": True,
    "rope_max_seq_len": 32,
}


# diffusers' Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer config (the other arguments keep their defaults).
WAN21_T2V_1_3B = {
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "num_layers": 30,
    "text_dim": 4096,
    "eps": 1e-6,
}


def tiny_wan_transformer() -> torch.nn.Module:
    """A ``WanTransformer3DModel`` built from ``TINY_WAN_CONFIG`` (random weights, eval mode; needs diffusers)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**TINY_WAN_CONFIG).eval()


def wan_inputs(frames: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (latent [1, 16, frames, size, size], timestep [1], text [1, 8, 32]); frames * size^2 / 4 tokens."""
    return torch.randn(1, 16, frames, size, size), torch.tensor([500]), torch.randn(1, 8, 32)


def run_wan(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The model's output [1, 16, frames, size, size] for ``wan_inputs``, without autograd."""
    with torch.no_grad():
        return model(*inputs, return_dict=False)[0]
