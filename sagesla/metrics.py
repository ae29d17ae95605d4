"""Error metrics used everywhere (tests, benchmarks, calibration): computed in float64."""

import torch


def rel_l1(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``sum|x - ref| / sum|ref|``."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).abs().sum() / ref.abs().sum().clamp_min(1e-300))


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors."""
    x, ref = x.detach().double().flatten(), ref.detach().double().flatten()
    return float(torch.nn.functional.cosine_similarity(x, ref, dim=0, eps=1e-300))


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Root mean square error."""
    return float((x.detach().double() - ref.detach().double()).pow(2).mean().sqrt())
