"""Calibration to an output quality: topk allocated where error buys the most sparsity, judged by output PSNR.

Shapes: NL layers, NB timestep buckets, NC candidates (ascending), H heads; a unit is one (layer, bucket) pair;
latents [B, C, F, H, W] (the model's latent space), one sample per batch row.

``lagrangian_path`` orders profiles by sparsity, each spending mean error where it buys the most sparsity;
``OutputJudge`` samples the calibration inputs with the model following a profile and measures the PSNR of the
final latents (or of the videos a ``decode`` makes of them) against the dense model's; ``sparsest_passing``
binary-searches a path with it.
``choose_at_quality`` (``calibrate(..., target_psnr=...)``) returns the sparsest profile of the path that reaches a
target PSNR; ``budget_at_quality`` does the same along the per-layer budget rule (``choose``), for comparison.
"""

import contextlib
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from sagesla import metrics, validation
from sagesla.calibration import sampling
from sagesla.calibration.choose import check_metric, choose, worst_error
from sagesla.calibration.record import Progress
from sagesla.patching.timesteps import TimestepTracker
from sagesla.profile import JUDGED_ON, Measurements, Profile, Selection

logger = logging.getLogger("sagesla")

# profile -> output PSNR in dB (``OutputJudge``).
Judge = Callable[[Profile], float]
# final latents [B, C, F, H, W] -> videos [B, ...] with values in [-1, 1] (``OutputJudge(decode=...)``).
Decode = Callable[[torch.Tensor], torch.Tensor]
# The PSNR range of decoded videos, whose values lie in [-1, 1].
VIDEO_RANGE = 2.0


def check_target_psnr(target_psnr: object, target_sparsity: object = None, per_head: object = False) -> None:
    """Validate ``target_psnr`` (None: not asked for) against the other selection arguments.

    Raises:
        TypeError: ``target_psnr`` is not a number.
        ValueError: it is not finite and > 0, or it comes with ``target_sparsity`` or ``per_head``.
    """
    if target_psnr is None:
        return
    accepted = "a finite float > 0 (dB)"
    if not validation.is_number(target_psnr):
        raise TypeError(f"`target_psnr` must be {accepted}, got {type(target_psnr).__name__} {target_psnr!r:.80}")
    if not 0 < target_psnr < math.inf:
        raise ValueError(f"`target_psnr` must be {accepted}, got {target_psnr!r}")
    if target_sparsity is not None:
        raise ValueError(
            f"give `target_psnr` or `target_sparsity`, not both: got target_psnr {target_psnr!r} and "
            f"target_sparsity {target_sparsity!r}"
        )
    if per_head is not False:
        raise ValueError(
            f"`per_head` applies to the budget rule and `target_psnr` allocates per layer: leave `per_head` False, "
            f"got {per_head!r}"
        )


def mean_error(measurements: Measurements, metric: str) -> torch.Tensor:
    """The mean error over observations, [NL, NB, NC]: rel-L1 ("rel_l1") or 1 - cosine similarity ("cosine").

    The mean, not the worst case, is what the output error follows: a layer's error adds up over every call.
    """
    check_metric(metric)
    return measurements.rel_l1_mean if metric == "rel_l1" else 1.0 - measurements.cosine_mean


def profile_at(measurements: Measurements, index: torch.Tensor, metric: str, per_head: bool = False) -> Profile:
    """The profile running candidate ``index`` [NL, NB] (int64) in each unit.

    Its ``selection.budget`` is the largest worst error (``worst_error``) at that choice, so every calibration
    observation met it (``met`` True everywhere); every head runs its layer's topk (``head_topk``).
    """
    candidates = torch.tensor(measurements.candidates, dtype=torch.float64)
    topk = candidates[index]
    worst = worst_error(measurements, metric, per_head)
    worst = worst.amax(dim=-1) if per_head else worst
    # 1 - cosine may round below 0.
    budget = max(float(worst.gather(2, index[..., None]).max()), 0.0)
    heads = measurements.layers[0].heads
    head_topk = topk[..., None].expand(*topk.shape, heads).contiguous()
    met = torch.ones(topk.shape, dtype=torch.bool)
    return Profile(measurements, Selection(metric, budget, per_head), topk, head_topk, met)


def dense_most(measurements: Measurements, metric: str = "rel_l1", per_head: bool = False) -> Profile:
    """The largest candidate in every unit (1.0 from ``Recording``: every layer runs diffusers' attention)."""
    index = torch.full(measurements.shape("LB"), len(measurements.candidates) - 1, dtype=torch.int64)
    return profile_at(measurements, index, metric, per_head)


def _hull_walk(error: Sequence[float], sparsity: Sequence[float]) -> tuple[int, list[tuple[float, int]]]:
    """One unit's choice as lam grows from 0: (the candidate at lam = 0, [(lam from which, candidate)]).

    The choices are the lower convex hull of the (sparsity, error) points, from the least error (ties: the sparser,
    then the smaller topk) to the largest sparsity; each lam is the slope to the next hull point, strictly rising.
    """
    candidates = range(len(error))
    current = min(candidates, key=lambda c: (error[c], -sparsity[c], c))
    start, moves = current, []
    while True:
        slopes = {
            c: (error[c] - error[current]) / (sparsity[c] - sparsity[current])
            for c in candidates
            if sparsity[c] > sparsity[current]
        }
        if not slopes:
            return start, moves
        lam = min(slopes.values())
        # Every candidate on that line ties at lam itself; just above it the sparsest one wins.
        current = min((c for c, slope in slopes.items() if slope == lam), key=lambda c: (-sparsity[c], error[c], c))
        moves.append((lam, current))


def lagrangian_path(measurements: Measurements, metric: str = "rel_l1") -> list[Profile]:
    """Profiles of growing sparsity, each spending mean error where it buys the most sparsity.

    For a multiplier lam >= 0 every unit takes the candidate minimising ``error - lam * sparsity`` (error: the mean
    over observations, ``mean_error``, and 0 at topk 1.0, where the applied profile runs diffusers' attention;
    sparsity: the unit's mean). No choice of candidates reaches that mean sparsity (weighted by observations) with
    less total mean error. lam = 0 gives each unit its least error (topk 1.0 unless another candidate measured no
    error at all), a large lam its sparsest candidate (the smallest topk); the path holds the choice at lam = 0 and
    one more at each lam where some unit moves, so each profile differs from the one before and every unit's
    sparsity only grows.

    Args:
        measurements: from ``Recording.measurements()``.
        metric: "rel_l1" (mean rel-L1) or "cosine" (mean 1 - cosine similarity).
    Returns:
        the profiles, least sparse first (``profile_at``: each ``selection.budget`` its largest worst error).
    Example:
        >>> [round(p.mean_sparsity(), 3) for p in lagrangian_path(profile.measurements)]
    """
    error = mean_error(measurements, metric).double()
    # Applied, a unit at topk 1.0 runs diffusers' attention (``sagesla.patch``): no error, whatever SLA at 1.0 measured.
    error = error.masked_fill(torch.tensor(measurements.candidates) == 1.0, 0.0)
    units = error.flatten(0, 1).tolist()
    sparsities = measurements.sparsity.double().flatten(0, 1).tolist()
    starts, moves = [], []
    for unit, (error, sparsity) in enumerate(zip(units, sparsities, strict=True)):
        start, walk = _hull_walk(error, sparsity)
        starts.append(start)
        moves += [(lam, unit, candidate) for lam, candidate in walk]
    # By lam; one unit's moves come at strictly rising lam, so they stay in order.
    moves.sort()
    index = torch.tensor(starts, dtype=torch.int64)
    shape = measurements.shape("LB")
    path = [index.view(shape).clone()]
    for _, group in itertools.groupby(moves, key=lambda move: move[0]):
        for _, unit, candidate in group:
            index[unit] = candidate
        path.append(index.view(shape).clone())
    return [profile_at(measurements, choice, metric) for choice in path]


def budget_path(measurements: Measurements, metric: str = "rel_l1", per_head: bool = False) -> list[Profile]:
    """The budget rule's profiles (``choose``) of growing budget, one per distinct choice: for each, the largest
    measured error level that gives it. Sparsity never falls along it (a looser budget never gives a larger topk).
    """
    errors = worst_error(measurements, metric, per_head)
    levels = torch.unique((errors.amax(dim=-1) if per_head else errors).flatten()).tolist()
    path: list[Profile] = []
    for level in levels:
        # 1 - cosine may round below 0.
        profile = choose(measurements, budget=max(level, 0.0), metric=metric, per_head=per_head)
        if path and torch.equal(path[-1].topk, profile.topk):
            path[-1] = profile
        else:
            path.append(profile)
    return path


def sparsest_passing(count: int, passes: Callable[[int], bool]) -> int | None:
    """The largest index in [0, count) where ``passes`` holds, by binary search; None when it fails at 0.

    Assumes ``passes`` holds up to some index and fails after it (a path of growing sparsity against a quality
    target). It is called at most ``count.bit_length()`` times, and the index returned is one where it was called
    and held.
    """
    if not validation.is_number(count, int) or count < 1:
        raise ValueError(f"`count` must be an int >= 1 (the path's length), got {count!r}")
    # passes(low) held (or low = -1), passes(high) failed (or high = count).
    low, high = -1, count
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            low = middle
        else:
            high = middle
    return None if low < 0 else low


def output_psnr(
    samples: Sequence[torch.Tensor], dense: Sequence[torch.Tensor], data_range: float | None = None
) -> float:
    """Mean over samples of each one's PSNR in dB against the dense model's, ``10 log10(range^2 / MSE)``.

    Args:
        samples, dense: final latents [B, C, F, H, W] (or decoded videos [B, ...]) per input; every batch row is
            one sample (``metrics.psnr``, in float64; identical rows give a large finite value, the MSE clamped at
            1e-300).
        data_range: the PSNR range; None: each dense row's max - min (latents have no fixed range).
    """
    values = [
        metrics.psnr(
            sample_row,
            dense_row,
            data_range=float(dense_row.amax() - dense_row.amin()) if data_range is None else data_range,
        )
        for sample, reference in zip(samples, dense, strict=True)
        for sample_row, dense_row in zip(sample, reference.double(), strict=True)
    ]
    return sum(values) / len(values)


def _sla_processors(model: nn.Module) -> dict[str, object]:
    """{layer name: SLA processor} of a patched model."""
    from sagesla.patching.processor import SLAProcessor

    found = {
        module.processor.layer_name: module.processor
        for module in model.modules()
        if isinstance(getattr(module, "processor", None), SLAProcessor)
    }
    if not found:
        raise ValueError("`model` has no SLA layer: sagesla.patch it first (any topk)")
    return found


class OutputJudge:
    """The output PSNR of a profile: the calibration inputs sampled with the model following it, against the dense
    model's final latents (``output_psnr``), or against its videos when ``decode`` is given.

    Each input is denoised as ``calibrate`` does (``sampling.denoise``: the same noise, text, steps and shift) with
    every SLA layer at the profile's topk for the running timestep bucket, as ``sagesla.patch(model, profile=...)``
    runs it: a bucket at topk 1.0 runs diffusers' attention. The layers' own SLA modules (settings, ``proj_l``)
    serve, and each processor's topk and timestep tracker are restored after the run. One call costs
    ``len(inputs) * steps`` forwards.

    Latents have no fixed range, so their PSNR takes each dense row's max - min; a model whose videos are cheap to
    decode is better judged on them, as a viewer sees it: ``decode`` maps final latents to videos in [-1, 1]
    (``VIDEO_RANGE``; clamp them as the pipeline does), and the PSNR is the video PSNR a demo reports.

    Args:
        model: a Wan transformer patched by ``sagesla.patch`` (any topk).
        inputs: (latents [B, C, F, H, W] starting noise, text [B, T, text_dim]) pairs, as ``calibrate`` takes them.
        steps, shift: the denoising run's.
        dense: the dense model's final latents of each input (``sampling.denoise``'s output); None samples them
            here (every layer at topk 1.0, i.e. diffusers' attention).
        decode: final latents [B, C, F, H, W] -> videos [B, ...] in [-1, 1]; None: the latents are compared.
    Attributes:
        judged_on: "videos" with ``decode``, else "latents" (``Selection.judged_on``).
    Raises:
        TypeError: ``decode`` is not callable.
        ValueError: ``model`` has no SLA layer, or a dense final latent row is not finite or constant (no range).
    Example:
        >>> sagesla.patch(model, topk=1.0)
        >>> judge = OutputJudge(model, inputs, steps=10)
        >>> judge(profile)  # dB
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *,
        steps: int,
        shift: float = sampling.DEFAULT_SHIFT,
        dense: Sequence[torch.Tensor] | None = None,
        decode: Decode | None = None,
    ):
        validation.check_positive("steps", steps)
        if decode is not None and not callable(decode):
            raise TypeError(f"`decode` must be a callable (latents -> videos in [-1, 1]) or None, got {decode!r:.80}")
        self.model, self.inputs, self.steps, self.shift = model, list(inputs), steps, shift
        self.decode = decode
        self.judged_on = JUDGED_ON[0] if decode is None else JUDGED_ON[1]
        self.processors = _sla_processors(model)
        if dense is None:
            dense = self.sample(dict.fromkeys(self.processors, (1.0,)), ())
        if len(dense) != len(self.inputs):
            raise ValueError(f"`dense` must hold one final latent per input ({len(self.inputs)}), got {len(dense)}")
        for i, latents in enumerate(dense):
            rows = latents.detach().flatten(1)
            if not bool(torch.isfinite(rows).all()) or bool((rows.amax(1) == rows.amin(1)).any()):
                raise ValueError(
                    f"`dense[{i}]`: the dense final latents must be finite and not constant in any row (PSNR needs "
                    "their range)"
                )
        self.dense = [self._compared(latents.detach()) for latents in dense]

    def _compared(self, latents: torch.Tensor) -> torch.Tensor:
        """What the PSNR compares: ``latents`` or their videos."""
        return latents if self.decode is None else self.decode(latents)

    @contextlib.contextmanager
    def _following(self, layer_topk: Mapping[str, Sequence[float]], edges: Sequence[float]) -> Iterator[None]:
        """Every SLA layer at ``layer_topk[name][bucket]`` for the bucket (of ``edges``) of the running timestep."""
        # A model patched with dense_steps keeps them.
        ranges = next((p.timesteps.dense_ranges for p in self.processors.values() if p.timesteps is not None), ())
        tracker = TimestepTracker(edges, ranges)
        saved = {name: (p.bucket_topk, p.timesteps) for name, p in self.processors.items()}
        try:
            for name, processor in self.processors.items():
                processor.bucket_topk, processor.timesteps = tuple(layer_topk[name]), tracker
            tracker.attach(self.model)
            yield
        finally:
            tracker.detach()
            for name, (bucket_topk, timesteps) in saved.items():
                self.processors[name].bucket_topk, self.processors[name].timesteps = bucket_topk, timesteps

    def sample(self, layer_topk: Mapping[str, Sequence[float]], edges: Sequence[float]) -> list[torch.Tensor]:
        """The final latents [B, C, F, H, W] fp32 of every input, each SLA layer at ``layer_topk[name][bucket]``."""
        with self._following(layer_topk, edges):
            return [
                sampling.denoise(self.model, latents, text, self.steps, self.shift) for latents, text in self.inputs
            ]

    def __call__(self, profile: Profile) -> float:
        """``profile``'s output PSNR in dB: the mean over samples (``output_psnr``)."""
        ours, theirs = set(self.processors), {layer.name for layer in profile.layers}
        if ours != theirs:
            raise ValueError(
                f"the profile's layers must be the model's SLA layers: only in the profile {sorted(theirs - ours)}, "
                f"only in the model {sorted(ours - theirs)}"
            )
        samples = [self._compared(latents) for latents in self.sample(profile.layer_topk(), profile.bucket_edges)]
        return output_psnr(samples, self.dense, None if self.decode is None else VIDEO_RANGE)


def _search(path: Sequence[Profile], judge: Judge, target_psnr: float, progress: bool) -> tuple[int, float, bool]:
    """(index of the sparsest profile of ``path`` whose PSNR reaches the target, else 0; its measured PSNR; met)."""
    measured: dict[int, float] = {}
    bar = Progress(len(path).bit_length(), progress, "judging", "profile")

    def passes(index: int) -> bool:
        measured[index] = float(judge(path[index]))
        bar.update()
        return measured[index] >= target_psnr

    try:
        found = sparsest_passing(len(path), passes)
    finally:
        bar.close()
    return (0, measured[0], False) if found is None else (found, measured[found], True)


def _from_dense_most(path: list[Profile], measurements: Measurements, metric: str, per_head: bool) -> list[Profile]:
    """``path`` led by the dense-most profile (unless it starts there already)."""
    first = dense_most(measurements, metric, per_head)
    return path if torch.equal(path[0].topk, first.topk) else [first, *path]


def _warn_missed(rule: str, target_psnr: float, psnr: float) -> None:
    logger.warning(
        "sagesla: %s: output PSNR %g dB is out of reach: the largest candidate everywhere gives %.2f dB; it is "
        "returned with met False",
        rule,
        target_psnr,
        psnr,
    )


def choose_at_quality(
    measurements: Measurements,
    judge: Judge,
    target_psnr: float,
    *,
    metric: str = "rel_l1",
    judged_on: str = JUDGED_ON[0],
    progress: bool = False,
) -> Profile:
    """The sparsest profile of the Lagrangian path whose output PSNR reaches ``target_psnr``.

    The path (the dense-most profile, then ``lagrangian_path``) is binary-searched with ``judge``
    (``sparsest_passing``), which assumes the PSNR falls along it; about log2(path length) profiles are sampled,
    and the one returned was measured. Its ``selection`` records ``target_psnr`` and the measured
    ``output_psnr``; ``met`` is True everywhere. When even the dense-most profile misses the target, that one is
    returned with ``met`` False everywhere and a warning on the "sagesla" logger: nothing raises.

    Args:
        measurements: from ``Recording.measurements()``.
        judge: profile -> output PSNR in dB (``OutputJudge``).
        target_psnr: a finite float > 0, in dB.
        metric: the mean error allocated: "rel_l1" or "cosine" (1 - cosine similarity).
        judged_on: what ``judge`` compares, "latents" or "videos" (``OutputJudge.judged_on``), for the record.
        progress: a progress bar over the judged profiles.
    Returns:
        a ``Profile``.
    Raises:
        TypeError / ValueError: a bad ``target_psnr``, ``metric`` or ``judged_on`` (before any judging).
    """
    check_target_psnr(target_psnr)
    if judged_on not in JUDGED_ON:
        raise ValueError(f"`judged_on` must be one of {JUDGED_ON}, got {judged_on!r:.80}")
    path = _from_dense_most(lagrangian_path(measurements, metric), measurements, metric, False)
    index, psnr, met = _search(path, judge, float(target_psnr), progress)
    if not met:
        _warn_missed("target_psnr", target_psnr, psnr)
    chosen = path[index]
    selection = dataclasses.replace(
        chosen.selection, target_psnr=float(target_psnr), output_psnr=psnr, judged_on=judged_on
    )
    return dataclasses.replace(chosen, selection=selection, met=torch.full_like(chosen.met, met))


@dataclasses.dataclass(frozen=True)
class QualityBudget:
    """The per-layer budget rule at an output quality (``budget_at_quality``).

    Attributes:
        profile: the budget rule's profile (``choose``) of the largest budget whose output PSNR reaches the
            target; the dense-most profile (largest candidate everywhere) when none does.
        output_psnr: its measured output PSNR, dB.
        met: whether it reaches the target.
    """

    profile: Profile
    output_psnr: float
    met: bool

    def __str__(self) -> str:
        budget = self.profile.selection.budget
        line = (
            f"per-layer budget {budget:.4g}: mean sparsity {self.profile.mean_sparsity():.2%} at "
            f"{self.output_psnr:.2f} dB"
        )
        return line if self.met else f"{line} (no budget reaches the target: the largest candidate everywhere)"


def budget_at_quality(
    measurements: Measurements,
    judge: Judge,
    target_psnr: float,
    *,
    metric: str = "rel_l1",
    per_head: bool = False,
    progress: bool = False,
) -> QualityBudget:
    """The largest budget of the per-layer budget rule (``choose``) whose output PSNR still reaches ``target_psnr``.

    The same judge and search as ``choose_at_quality``, along ``budget_path`` (led by the dense-most profile), so
    the two rules compare at equal output quality.

    Args:
        measurements, judge, target_psnr, progress: as in ``choose_at_quality``.
        metric, per_head: the budget rule's (``choose``).
    Returns:
        a ``QualityBudget``; when no budget reaches the target, ``met`` False and a warning on the "sagesla" logger.
    Example:
        >>> profile = choose_at_quality(measurements, judge, 35.0)
        >>> ours = f"sparsity {profile.mean_sparsity():.2%} at {profile.selection.output_psnr:.2f} dB"
        >>> theirs = budget_at_quality(measurements, judge, 35.0)
        >>> print(f"target-psnr mode: {ours}; per-layer budget mode at equal quality: {theirs}")
    """
    check_target_psnr(target_psnr)
    check_metric(metric)
    validation.check_bool("per_head", per_head)
    path = _from_dense_most(budget_path(measurements, metric, per_head), measurements, metric, per_head)
    index, psnr, met = _search(path, judge, float(target_psnr), progress)
    if not met:
        _warn_missed("budget_at_quality", target_psnr, psnr)
    return QualityBudget(path[index], psnr, met)
