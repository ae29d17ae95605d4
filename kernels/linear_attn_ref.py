"""Reference linear-attention branch of SLA.

``o_l = phi(q) S / (1e-5 + phi(q) . z)`` with ``S = sum_c phi(k_c)^T v_c`` ([D, D] per head) and ``z = sum_c phi(k_c)``.
Scope "all" sums over every token; scope "complement" sums, for query block i, only over the key blocks not
selected for it: ``S_i = S - sum_{j in lut_i} S_j``. Then ``proj_l(o_l) = o_l W^T + b`` in fp32.
"""

import torch

from sagesla.kernels.blocks_ref import at_least_fp32, to_blocks
from sagesla.kernels.constants import DENOM_EPS

FEATURE_MAPS = ("softmax", "elu", "relu")
LINEAR_SCOPES = ("all", "complement")


def feature_map_ref(x: torch.Tensor, name: str) -> torch.Tensor:
    """phi over the last dim, in fp32 (float64 stays float64): softmax, elu(x) + 1, or relu."""
    x = at_least_fp32(x)
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    if name == "elu":
        return torch.nn.functional.elu(x) + 1.0
    if name == "relu":
        return torch.relu(x)
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {name!r}")


def linear_state_ref(
    k: torch.Tensor, v: torch.Tensor, feature_map: str, block_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-key-block linear-attention states.

    Args:
        k, v: [B, H, L, D].
    Returns:
        kv: [B, H, NK, D, D] fp32, ``sum over the block of phi(k)^T v``; ksum: [B, H, NK, D] fp32, ``sum of phi(k)``.
        (Tail padding contributes nothing: padded rows of v are zero and are dropped from ksum.)
    """
    phi_k = to_blocks(feature_map_ref(k, feature_map), block_k)
    length = k.shape[-2]
    real = (torch.arange(phi_k.shape[-3] * block_k, device=k.device) < length).view(phi_k.shape[-3], block_k, 1)
    phi_k = phi_k * real
    return phi_k.transpose(-1, -2) @ to_blocks(at_least_fp32(v), block_k), phi_k.sum(dim=-2)


def linear_attn_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    *,
    scope: str = "all",
    block_mask: torch.Tensor | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """The linear branch followed by ``proj_l``.

    Args:
        q, k, v: [B, H, L, D] in the compute dtype.
        feature_map: "softmax", "elu" or "relu".
        proj_weight: [D, D]; proj_bias: [D] or None (``proj_l`` of thu-ml's module).
        scope: "all" or "complement"; "complement" needs ``block_mask`` [B, H, NQ, NK] bool (True = selected).
        block_q, block_k: BQ, BK (used by scope "complement").
    Returns:
        proj_l(o_l): [B, H, L, D] fp32.
    """
    phi_q = feature_map_ref(q, feature_map)
    if scope == "all":
        phi_k = feature_map_ref(k, feature_map)
        kv = phi_k.transpose(-1, -2) @ at_least_fp32(v)
        o_l = (phi_q @ kv) / (DENOM_EPS + phi_q @ phi_k.sum(dim=-2)[..., None])
    elif scope == "complement":
        if block_mask is None:
            raise ValueError("linear_attn_ref: scope='complement' needs `block_mask`")
        kv_blocks, ksum_blocks = linear_state_ref(k, v, feature_map, block_k)
        rest = (~block_mask).to(kv_blocks.dtype)
        kv = (rest @ kv_blocks.flatten(-2)).unflatten(-1, kv_blocks.shape[-2:])
        ksum = rest @ ksum_blocks
        phi_qb = to_blocks(phi_q, block_q)
        o_l = (phi_qb @ kv) / (DENOM_EPS + phi_qb @ ksum[..., None])
        o_l = o_l.flatten(-3, -2)[..., : q.shape[-2], :]
    else:
        raise ValueError(f"scope must be one of {LINEAR_SCOPES}, got {scope!r}")
    o_l = o_l @ at_least_fp32(proj_weight).t()
    return o_l if proj_bias is None else o_l + at_least_fp32(proj_bias)
