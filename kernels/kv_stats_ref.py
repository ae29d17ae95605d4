"""Reference token reductions of K and V: K mean, V channel maxima, the linear state phi(K)^T V and sum phi(K)."""

from typing import NamedTuple

import torch

from sagesla.kernels.linear_attn_ref import feature_map_ref


class KVStats(NamedTuple):
    """Reductions over all tokens of K and V, each per (batch, head); None where not asked for.

    k_mean: [B, H, 1, D] fp32 token mean of K.       v_amax: [B, H, D] fp32 per-channel max of |V|.
    kv: [B, H, D, D] fp32 ``sum_c phi(k_c)^T v_c``.   ksum: [B, H, D] fp32 ``sum_c phi(k_c)``.
    """

    k_mean: torch.Tensor
    v_amax: torch.Tensor | None
    kv: torch.Tensor | None
    ksum: torch.Tensor | None


def kv_stats_ref(k: torch.Tensor, v: torch.Tensor, v_amax: bool, feature_map: str | None) -> KVStats:
    """The token reductions the quantizers and the linear branch need.

    Args:
        k, v: [B, H, L, D].
        v_amax: compute the V maxima (only FP8 V needs them).
        feature_map: phi of the linear branch, or None to skip its state.
    """
    kf, vf = k.float(), v.float()
    amax = vf.abs().amax(dim=-2) if v_amax else None
    if feature_map is None:
        return KVStats(kf.mean(dim=-2, keepdim=True), amax, None, None)
    phi = feature_map_ref(kf, feature_map)
    return KVStats(kf.mean(dim=-2, keepdim=True), amax, phi.transpose(-1, -2) @ vf, phi.sum(dim=-2))
