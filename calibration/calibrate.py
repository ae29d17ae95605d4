"""``calibrate``: run the dense model over denoising steps, measure SageSLA per layer, choose topk."""

from collections.abc import Sequence

import torch
from torch import nn

import sagesla
from sagesla import validation
from sagesla.calibration import sampling
from sagesla.calibration.choose import check_selection, choose
from sagesla.calibration.quality import Decode, OutputJudge, check_target_psnr, choose_at_quality
from sagesla.calibration.record import DEFAULT_CANDIDATES, Recording
from sagesla.profile import Profile
from sagesla.settings import SLASettings


def _is_patched(model: nn.Module) -> bool:
    from sagesla.patching.processor import SLAProcessor

    return any(isinstance(getattr(module, "processor", None), SLAProcessor) for module in model.modules())


def _record_steps(steps: int, record_steps: Sequence[int] | None) -> list[int]:
    validation.check_positive("steps", steps)
    chosen = list(range(steps)) if record_steps is None else sorted(set(record_steps))
    if not chosen or any(not validation.is_number(i, int) or not 0 <= i < steps for i in chosen):
        raise ValueError(f"`record_steps` must be step indices in [0, {steps}), got {record_steps!r}")
    return chosen


def calibrate(
    model: nn.Module,
    inputs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int = 10,
    record_steps: Sequence[int] | None = None,
    shift: float = sampling.DEFAULT_SHIFT,
    budget: float = 0.05,
    metric: str = "rel_l1",
    target_sparsity: float | None = None,
    target_psnr: float | None = None,
    per_head: bool = False,
    buckets: int | Sequence[float] = 1,
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    settings: SLASettings | None = None,
    decode: Decode | None = None,
    progress: bool = True,
) -> Profile:
    """Calibrate a Wan transformer: per-layer topk within an error budget, measured on its own dense trajectory.

    Each input is denoised from its noise by the *dense* model (Euler flow matching, ``steps`` steps), so the
    trajectory is exactly the unpatched model's. At the ``record_steps``, every self-attention call also runs
    SageSLA at each candidate topk with the layer's SLA module and records rel-L1, cosine and sparsity per layer,
    head and timestep bucket (``Recording``); then ``choose`` picks topk. With ``target_psnr``,
    ``choose_at_quality`` picks it instead: the sparsest profile of the Lagrangian path whose output PSNR against
    this run's dense final latents reaches the target, judged by sampling the inputs again with the model
    following each profile tried (``OutputJudge``: about log2(path length) x ``len(inputs)`` x ``steps`` more
    forwards).

    Args:
        model: a diffusers ``WanTransformer3DModel``. If it is patched already (``sagesla.patch``, e.g. with
            SLA-finetuned ``proj_l`` loaded), its SLA settings are calibrated; if not, it is patched with
            ``settings`` for the run and unpatched afterwards.
        inputs: (latents [B, C, F, H, W] starting noise, text [B, T, text_dim] prompt embeddings) pairs; each batch
            row is one observation of every call.
        steps: denoising steps per input; record_steps: indices of the steps measured (default all).
        shift: the scheduler's timestep shift (Wan: 3.0 at 480p, 5.0 at 720p).
        budget, metric, per_head, target_sparsity: as in ``choose``.
        target_psnr: instead of a budget, the output PSNR (dB, finite > 0) to reach, as in ``choose_at_quality``
            (``metric`` then picks the mean error it allocates; ``budget`` is ignored; not with ``target_sparsity``
            or ``per_head``). If even topk 1.0 everywhere misses it, that profile comes back with ``met`` False.
        buckets: timestep buckets with their own topk: an int N splits the recorded steps' timesteps into N groups
            of equal size, or give the ascending edges between buckets.
        candidates: topk values to evaluate (1.0 is always added).
        settings: the ``SLASettings`` to patch with when ``model`` is not patched (default: ``sagesla.patch``'s).
        decode: with ``target_psnr``, judge the videos instead of the final latents: latents [B, C, F, H, W] ->
            videos [B, ...] in [-1, 1] (``OutputJudge``); None judges the latents.
        progress: show a progress bar over attention calls (and over the judged profiles).
    Returns:
        the ``Profile`` (``profile.save(path)`` writes it; ``sagesla.patch(model, profile=...)`` applies it).
    Example:
        >>> from sagesla.wan_shapes import tiny_wan_transformer
        >>> inputs = [(torch.randn(1, 16, 4, 32, 32), torch.randn(1, 8, 32))]
        >>> profile = calibrate(tiny_wan_transformer(), inputs, steps=4, budget=0.3)
    """
    # With target_psnr the budget is ignored.
    check_selection(budget if target_psnr is None else 0.0, metric, per_head, target_sparsity)
    check_target_psnr(target_psnr, target_sparsity, per_head)
    if decode is not None and not callable(decode):
        raise TypeError(f"`decode` must be a callable (latents -> videos in [-1, 1]) or None, got {decode!r:.80}")
    if decode is not None and target_psnr is None:
        raise ValueError("`decode` serves the output PSNR: give it with `target_psnr`, or leave it None")
    recorded = _record_steps(steps, record_steps)
    schedule = sampling.timesteps(shift, steps)
    if isinstance(buckets, int):
        edges = sampling.bucket_edges([schedule[i] for i in recorded], buckets)
    else:
        edges = tuple(float(edge) for edge in buckets)
    patch_here = not _is_patched(model)
    if patch_here:
        sagesla.patch(model, topk=1.0, settings=settings)
    try:
        recording = Recording(model, candidates, edges, progress=progress)
        recording.total = len(inputs) * len(recorded) * len(recording.layers)

        def before_step(index: int) -> None:
            recording.active = index in recorded

        with recording:
            dense = [sampling.denoise(model, latents, text, steps, shift, before_step) for latents, text in inputs]
        measurements = recording.measurements(
            steps=steps, record_steps=recorded, shift=shift, timesteps=schedule, inputs=len(inputs)
        )
        if target_psnr is not None:
            judge = OutputJudge(model, inputs, steps=steps, shift=shift, dense=dense, decode=decode)
            return choose_at_quality(
                measurements, judge, target_psnr, metric=metric, judged_on=judge.judged_on, progress=progress
            )
    finally:
        if patch_here:
            sagesla.unpatch(model)
    return choose(measurements, budget=budget, metric=metric, per_head=per_head, target_sparsity=target_sparsity)
