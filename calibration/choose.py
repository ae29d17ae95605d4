"""Choosing topk from measurements: the smallest candidate whose worst error stays within a budget.

Shapes: NL layers, NB timestep buckets, NC candidates (ascending), H heads.
"""

import math

import torch

from sagesla import validation
from sagesla.profile import METRICS, Measurements, Profile, Selection


def worst_error(measurements: Measurements, metric: str, per_head: bool) -> torch.Tensor:
    """The worst error over observations that a budget bounds: [NL, NB, NC, H] per head, else [NL, NB, NC].

    "rel_l1": the largest rel-L1; "cosine": the largest cosine distance, 1 - the smallest cosine similarity.
    """
    prefix = "head_" if per_head else ""
    if metric == "rel_l1":
        return getattr(measurements, f"{prefix}rel_l1_max")
    return 1.0 - getattr(measurements, f"{prefix}cosine_min")


def smallest_within(errors: torch.Tensor, budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the first candidate (last dim) with ``errors <= budget``, else of the last one; and whether met.

    Args:
        errors: [..., NC] worst errors per candidate, candidates ascending.
    Returns:
        index [...] int64, met [...] bool.
    """
    within = errors <= budget
    met = within.any(dim=-1)
    last = torch.full_like(met, errors.shape[-1] - 1, dtype=torch.int64)
    return torch.where(met, within.to(torch.int8).argmax(dim=-1), last), met


def _choose(measurements: Measurements, selection: Selection) -> Profile:
    candidates = torch.tensor(measurements.candidates, dtype=torch.float64)
    heads = worst_error(measurements, selection.metric, per_head=True)
    layer = heads.amax(dim=-1) if selection.per_head else worst_error(measurements, selection.metric, False)
    index, met = smallest_within(layer, selection.budget)
    head_index, _ = smallest_within(heads.movedim(-1, -2), selection.budget)
    return Profile(measurements, selection, topk=candidates[index], head_topk=candidates[head_index], met=met)


def _budget_for_sparsity(measurements: Measurements, metric: str, per_head: bool, target: float) -> float:
    """The smallest budget whose choice reaches mean sparsity ``target`` (sparsity grows with the budget)."""
    errors = worst_error(measurements, metric, per_head)
    levels = torch.unique((errors.amax(dim=-1) if per_head else errors).flatten()).tolist()

    def sparsity(budget: float) -> float:
        return _choose(measurements, Selection(metric, budget, per_head)).mean_sparsity()

    if sparsity(levels[-1]) < target:
        raise ValueError(
            f"`target_sparsity` {target} is out of reach: the smallest candidate everywhere gives mean sparsity "
            f"{sparsity(levels[-1]):.4f} (add smaller candidates or lower the target)"
        )
    low, high = 0, len(levels) - 1
    while low < high:
        middle = (low + high) // 2
        if sparsity(levels[middle]) >= target:
            high = middle
        else:
            low = middle + 1
    return float(levels[low])


def choose(
    measurements: Measurements,
    *,
    budget: float = 0.05,
    metric: str = "rel_l1",
    per_head: bool = False,
    target_sparsity: float | None = None,
) -> Profile:
    """Pick each layer's (and timestep bucket's) topk from measurements.

    Budget mode: the smallest candidate whose worst error over every calibration observation is within
    ``budget``. A layer no candidate meets gets the largest candidate (1.0 from ``Recording``: no key block
    skipped, quantization error only) and ``met`` False. A tighter budget never gives a smaller topk.
    Target mode (``target_sparsity``): the smallest budget whose choice reaches that mean sparsity, i.e. the
    least worst-case error across layers at that sparsity; the profile records the budget found.

    Args:
        measurements: from ``Recording.measurements()``.
        budget: bound on the worst error, >= 0 (ignored with ``target_sparsity``).
        metric: "rel_l1" (budget bounds rel-L1) or "cosine" (budget bounds 1 - cosine similarity).
        per_head: the budget must hold in every head, not only over each layer's whole output. The layer's topk
            is then the smallest candidate every head meets; ``head_topk`` holds each head's own choice.
        target_sparsity: mean sparsity in [0, 1) to reach (fraction of block pairs skipped, averaged over every
            layer's observations), instead of a budget.
    Returns:
        a ``Profile``.
    Raises:
        ValueError: a bad argument, or a ``target_sparsity`` no choice of candidates reaches.
    """
    check_selection(budget, metric, per_head, target_sparsity)
    if target_sparsity is not None:
        budget = _budget_for_sparsity(measurements, metric, per_head, float(target_sparsity))
    target = None if target_sparsity is None else float(target_sparsity)
    return _choose(measurements, Selection(metric, float(budget), per_head, target))


def check_selection(budget: float, metric: str, per_head: bool, target_sparsity: float | None) -> None:
    """Validate ``choose``'s arguments (``calibrate`` checks them before its run). Raises TypeError / ValueError."""
    check_metric(metric)
    if not isinstance(per_head, bool):
        raise TypeError(f"`per_head` must be a bool, got {type(per_head).__name__}")
    if target_sparsity is not None:
        if not validation.is_number(target_sparsity):
            raise TypeError(f"`target_sparsity` must be a float in [0, 1), got {type(target_sparsity).__name__}")
        if not 0 <= target_sparsity < 1:
            raise ValueError(f"`target_sparsity` must be in [0, 1), got {target_sparsity}")
    elif not validation.is_number(budget) or not 0 <= budget < math.inf:
        raise ValueError(f"`budget` must be a finite number >= 0, got {budget!r}")


def check_metric(metric: object) -> None:
    """Raise ValueError unless ``metric`` is one of ``METRICS``."""
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}")
