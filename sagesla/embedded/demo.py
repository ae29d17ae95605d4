"""``sagesla demo`` (the video demo): the embedded model sampled dense and with SLA variants, compared, pictured.

Every variant samples the same noise with the same prompts as dense, so its videos differ only by the attention:
- "SageSLA, calibrated": SageSLA with the per-layer topk of a calibration profile (``Calibration``: the shipped
  one, calibrated to ``DEFAULT_TARGET_PSNR`` dB of output PSNR, or one calibrated here); a layer the profile keeps
  at topk 1.0 in every timestep bucket runs diffusers' attention (``sagesla.patch``), so a profile at 1.0
  everywhere makes this variant the dense model (its rows say how many layers ran dense);
- "per-layer budget, same PSNR" (when calibrated here to an output PSNR): the per-layer budget rule at the largest
  budget whose output PSNR on the calibration videos reaches the same target (``budget_at_quality``), the rule the
  target-PSNR allocation replaces, judged on the same held-out videos;
- at one fixed topk (the fine-tune's, 0.1 without one) and the fine-tune's blocks (64 x 64):
  "sparse only": unquantized SLA with ``proj_l`` zero, which skips the linear branch: plain block-sparse attention;
  "SageSLA, not fine-tuned": quantized (INT8 Q/K, FP8 P/V), ``proj_l`` zero;
  "SageSLA, fine-tuned": quantized, with what ``scripts/finetune_tiny.py`` trained (given its file): ``proj_l``,
  and the self-attention weights or the whole transformer when it trained them.

Writes to an output folder: ``demo.gif`` (per prompt: dense | SageSLA calibrated [| SageSLA fine-tuned]) and
``frames.png`` (its every 8th frame, a row per prompt),
``profile.png`` (per-layer topk, sparsity and error from the calibration), ``profile.safetensors`` and
``report.json``. Videos are [3, F, S, S] in [-1, 1] (F = 32 frames of S x S = 64 x 64 pixels).
"""

import copy
import json
import math
import os
import pathlib
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sagesla import metrics, validation
from sagesla.embedded import finetuned
from sagesla.embedded.model import LATENT_SHAPE, TINY_VIDEO_CONFIG, WEIGHTS, build, config_of, load
from sagesla.embedded.videos import from_latent
from sagesla.files import check_output_path, write_text_atomic
from sagesla.profile import Profile
from sagesla.settings import SLA_BLOCK_SIZES
from sagesla.tables import markdown_table, run_header

# The shipped weights' profile, written by ``sagesla demo --target-psnr 35`` on a GPU (its profile.safetensors).
PROFILE = pathlib.Path(__file__).with_name("tiny-video.profile.safetensors")
DEFAULT_TARGET_PSNR = 35.0
DEMO_PROMPTS = (
    "red circle moves right, camera still",
    "blue square moves up, camera pans left",
    "yellow circle moves left, camera pans down",
)
CALIBRATED = "SageSLA, calibrated"
BUDGET_TWIN = "per-layer budget, same PSNR"
SPARSE = "sparse only"
UNTUNED = "SageSLA, not fine-tuned"
FINETUNED = "SageSLA, fine-tuned"
# A calibration here samples each prompt from these noise seeds (offsets from ``seed``), none of them the compared
# videos' (offset 0): the reported quality is measured on videos the calibration did not see.
CALIBRATION_OFFSETS = (1000, 2000)
# ``metrics.psnr`` of identical videos (its mean squared error is clamped away from 0).
_IDENTICAL_DB = metrics.psnr(torch.zeros(1), torch.zeros(1))


@dataclass(frozen=True)
class Calibration:
    """Where the calibrated variant's profile comes from: one of a profile file (``profile``), or a calibration run
    here, on the demo's prompts with other noise seeds (``CALIBRATION_OFFSETS``), to an output PSNR in dB of the
    videos (``target_psnr``: ``calibrate(..., target_psnr=, decode=)``) or within a per-layer budget (``budget``:
    worst rel-L1 per layer); a calibration here gives each of ``buckets`` timestep buckets its own topk.

    Raises:
        ValueError: not exactly one of the three, a value out of range, or ``buckets`` other than 1 with a profile.
    """

    profile: pathlib.Path | None = None
    target_psnr: float | None = None
    budget: float | None = None
    buckets: int = 1

    def __post_init__(self) -> None:
        from sagesla.calibration.choose import check_selection
        from sagesla.calibration.quality import check_target_psnr

        given = [name for name in ("profile", "target_psnr", "budget") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of `profile`, `target_psnr` and `budget`, got {given or 'none'}")
        check_target_psnr(self.target_psnr)
        if self.budget is not None:
            check_selection(self.budget, "rel_l1", False, None)
        validation.check_positive("buckets", self.buckets)
        if self.profile is not None and self.buckets != 1:
            raise ValueError(f"`buckets` applies to a calibration here, not to a profile file, got {self.buckets}")

    @classmethod
    def default(cls, weights: str | os.PathLike | None) -> "Calibration":
        """The shipped profile with the shipped weights (when both are there), else ``DEFAULT_TARGET_PSNR``."""
        if weights is not None and pathlib.Path(weights) == WEIGHTS and PROFILE.is_file():
            return cls(profile=PROFILE)
        return cls(target_psnr=DEFAULT_TARGET_PSNR)

    def __str__(self) -> str:
        if self.profile is not None:
            return f"profile {self.profile.name}"
        goal = f"calibrated here to {self.target_psnr:g} dB" if self.budget is None else f"budget {self.budget:g}"
        return goal if self.buckets == 1 else f"{goal}, {self.buckets} timestep buckets"


@dataclass(frozen=True)
class PromptResult:
    """One prompt, dense against SageSLA at the calibrated profile."""

    prompt: str
    dense_ms_per_step: float
    sla_ms_per_step: float
    sparsity: float
    psnr_db: float
    ssim: float


@dataclass(frozen=True)
class VariantResult:
    """One attention variant, means over the prompts; PSNR and SSIM against dense (None for dense itself).

    ``topk`` is 1.0 for dense and None for the calibrated profile (a topk per layer). ``dense_layers`` of the
    model's ``layers`` self-attention layers ran diffusers' attention: all of them for dense, the profile's
    topk-1.0 layers for the calibrated variant, none for the others. ``sparsity`` counts those layers as 0.
    """

    name: str
    topk: float | None
    ms_per_step: float
    sparsity: float
    psnr_db: float | None
    ssim: float | None
    dense_layers: int = 0
    layers: int = 0


@dataclass(frozen=True)
class VideoDemo:
    """What ``run_video_demo`` measured.

    Attributes:
        prompts: per prompt, dense against SageSLA at the calibrated profile.
        variants: dense first, then each SLA variant in the order of the module docstring.
        trained: whether trained dense weights were used (random ones otherwise).
        finetune: the fine-tune the last variant used, or None (no such variant).
        calibration: where the calibrated variant's profile came from.
    """

    prompts: list[PromptResult]
    variants: list[VariantResult]
    trained: bool
    finetune: finetuned.Finetune | None
    calibration: Calibration


@dataclass(frozen=True)
class SampledVideo:
    """A video ``sample_video`` denoised, its time per step and its sparsity."""

    video: torch.Tensor  # [3, F, S, S] in [-1, 1]
    ms_per_step: float
    # Mean over the forwards and the self-attention layers of the fraction of block pairs skipped (0 in dense ones).
    sparsity: float


def _videos(latents: torch.Tensor) -> torch.Tensor:
    """Final latents [N, C, F, H, W] -> videos [N, 3, F', H', W'] in [-1, 1] (clamped, as they are shown)."""
    return from_latent(latents).clamp(-1, 1)


def sample_video(
    model: nn.Module, noise: torch.Tensor, text: torch.Tensor, steps: int, guidance: float = 1.0, layers: int = 0
) -> SampledVideo:
    """Denoise ``noise`` [1, C, F, H, W] with ``text`` [1, 4, E] in ``steps`` steps (classifier-free ``guidance``
    against the null prompt), timed to the model's device. ``layers``: the model's self-attention layers, SLA's
    and those left dense (the sparsity's denominator; 0: the SLA layers alone)."""
    from sagesla.calibration.sampling import denoise

    processors = [p for p in model.attn_processors.values() if hasattr(p, "last_sparsity")]
    per_forward: list[float] = []

    def record(*_) -> None:  # a profile's topk changes with the timestep: every forward counts
        per_forward.append(sum(p.last_sparsity for p in processors) / max(layers, len(processors), 1))

    cuda = next(model.parameters()).is_cuda
    hook = model.register_forward_hook(record)
    try:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        latent = denoise(model, noise, text, steps, guidance=guidance)
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3 / steps
    finally:
        hook.remove()
    return SampledVideo(_videos(latent)[0], ms, sum(per_forward) / len(per_forward))


def _frames(videos: list[torch.Tensor], scale: int = 3):
    """Pillow frames of ``videos`` ([3, F, S, S] each) side by side with white bars between, ``scale`` times."""
    from PIL import Image

    bar = torch.ones_like(videos[0][..., :2])
    row = torch.cat([part for video in videos for part in (bar, video)][1:], dim=-1)
    pixels = ((row.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    return [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in pixels]


def _write_pictures(out: pathlib.Path, columns: list[list[SampledVideo]], every: int = 8) -> None:
    """``demo.gif``: per prompt, its videos of every column side by side, prompt after prompt; ``frames.png``: the
    same still, one row per prompt holding every ``every``-th frame (0, 8, 16, 24 of 32)."""
    from PIL import Image

    per_prompt = [_frames([s.video for s in row]) for row in zip(*columns, strict=True)]
    frames = [frame for prompt in per_prompt for frame in prompt]
    frames[0].save(out / "demo.gif", save_all=True, append_images=frames[1:], duration=120, loop=0)
    width, height, gap = frames[0].width, frames[0].height, 12
    picked = [prompt[::every] for prompt in per_prompt]
    sheet = Image.new("RGB", (len(picked[0]) * (width + gap) - gap, len(picked) * (height + gap) - gap), "white")
    for i, prompt in enumerate(picked):
        for j, frame in enumerate(prompt):
            sheet.paste(frame, (j * (width + gap), i * (height + gap)))
    sheet.save(out / "frames.png")


def _dense_model(
    weights: str | os.PathLike | None, config: dict, seed: int, device: str
) -> tuple[nn.Module, nn.Module]:
    """(transformer, prompt embedding) in eval mode: from ``weights``, or random from ``config`` seeded by ``seed``."""
    if weights is not None:
        return load(weights, device)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, embed = build(config)
    return model.to(device).eval(), embed.to(device).eval()


def _summary(
    name: str,
    topk: float | None,
    samples: list[SampledVideo],
    dense: list[SampledVideo] | None,
    layers: tuple[int, int],
) -> VariantResult:
    """Means over the prompts; PSNR and SSIM against ``dense`` (None when this is dense); ``layers``: (left dense,
    self-attention layers)."""

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    ms, sparsity = mean([s.ms_per_step for s in samples]), mean([s.sparsity for s in samples])
    if dense is None:
        return VariantResult(name, topk, ms, sparsity, None, None, *layers)
    pairs = list(zip(samples, dense, strict=True))
    psnr = mean([metrics.psnr(s.video, d.video) for s, d in pairs])
    ssim = mean([metrics.ssim(s.video, d.video) for s, d in pairs])
    return VariantResult(name, topk, ms, sparsity, psnr, ssim, *layers)


def run_video_demo(
    out_dir: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = WEIGHTS,
    sla_weights: str | os.PathLike | None = finetuned.SLA_WEIGHTS,
    prompts: tuple[str, ...] = DEMO_PROMPTS,
    steps: int = 10,
    guidance: float = 1.0,
    calibration: Calibration | None = None,
    topk: float | None = None,
    seed: int = 0,
    device: str | None = None,
    config: dict = TINY_VIDEO_CONFIG,
    progress: bool = True,
) -> VideoDemo:
    """Calibrate (or read a profile), then sample dense and every variant; writes the outputs to ``out_dir``.

    A calibration runs on the same prompts with other noise seeds; the compared samples all use ``seed``.

    Args:
        out_dir: output folder (created).
        weights: dense weights (``scripts/train_tiny.py``); None: random weights built from ``config``, seeded.
        sla_weights: fine-tuned SLA weights (``scripts/finetune_tiny.py``); None: no fine-tuned variant.
        prompts: one video per prompt.
        steps: denoising steps.
        calibration: the calibrated variant's profile; None: ``Calibration.default(weights)``.
        guidance: classifier-free guidance scale of the compared samples (1: none; for weights trained with
            ``train_tiny.py --text-dropout``); the calibration runs the conditional forward alone.
        topk: the fixed topk of the last variants; None: the fine-tune's, ``DEFAULT_TOPK`` without one.
        device: default CUDA when available.
        progress: show the calibration's progress bar.
    Raises:
        FileNotFoundError: ``weights`` or ``sla_weights`` names no file.
        ValueError: ``steps``, ``guidance`` or ``prompts`` out of range, ``sla_weights`` records no fine-tune, or
            its ``proj_l`` do not fit the model.
        ProfileError: ``calibration.profile`` is not a valid profile, or not one of this model's layers.
        OSError: ``out_dir`` cannot be created or written into (``files.check_output_path``).
    """
    import sagesla
    from sagesla.calibration import plot_profile
    from sagesla.profile import load_profile

    # Every argument before the model is built: nothing fails after the calibration ran.
    validation.check_positive("steps", steps)
    if not validation.is_number(guidance) or not 1 <= guidance < math.inf:
        raise ValueError(f"`guidance` must be a finite float >= 1 (1: no guidance), got {guidance!r}")
    calibration = calibration or Calibration.default(weights)
    if calibration.buckets > steps:
        raise ValueError(f"`calibration.buckets` must be at most `steps` ({steps}), got {calibration.buckets}")
    if topk is not None:
        validation.check_topk(topk)
    if not prompts:
        raise ValueError("`prompts` must hold at least one prompt, got none")
    check_output_path(out_dir, folder=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    finetune = None if sla_weights is None else finetuned.read(sla_weights)
    if topk is None:
        topk = finetune.topk if finetune is not None else finetuned.DEFAULT_TOPK
    blocks = (finetune.block_q, finetune.block_k) if finetune is not None else SLA_BLOCK_SIZES
    fixed = {"topk": topk, "block_q": blocks[0], "block_k": blocks[1]}
    model, embed = _dense_model(weights, config, seed, device)
    if calibration.profile is not None:
        profile = load_profile(calibration.profile)
        sagesla.patch(model, profile=profile)  # a profile that does not fit the model fails here, before sampling
        sagesla.unpatch(model)
    if finetune is not None:
        # Patched and loaded first: a file that does not fit the model fails before the calibration.
        tuned = load(sla_weights, device)[0] if finetune.train == "all" else copy.deepcopy(model)
        if config_of(tuned) != config_of(model):
            raise ValueError(
                f"`sla_weights` {str(sla_weights)!r} fine-tuned a model of config {config_of(tuned)}, not the dense "
                f"model's {config_of(model)}"
            )
        tuned_layers = len(sagesla.patch(tuned, **fixed).replaced)
        sagesla.load_sla_weights(tuned, sla_weights)
        if finetune.train == "attention":
            finetuned.load_attention(tuned, sla_weights)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        texts = [embed([p]) for p in prompts]

    def noise(index: int, offset: int) -> torch.Tensor:
        return torch.randn(1, *LATENT_SHAPE, generator=torch.Generator().manual_seed(seed + offset + index))

    twin = None
    if calibration.profile is None:
        seeds = len(CALIBRATION_OFFSETS)
        inputs = [
            (torch.cat([noise(i, offset) for offset in CALIBRATION_OFFSETS]), t.expand(seeds, -1, -1))
            for i, t in enumerate(texts)
        ]
        profile, twin = _calibrate_here(model, inputs, steps, calibration, progress)
    profile.save(out / "profile.safetensors")
    plot_profile(profile, str(out / "profile.png"))

    def run(variant: nn.Module, layers: int) -> list[SampledVideo]:
        sample_video(
            variant, noise(0, 0), texts[0], 1, guidance, layers
        )  # warm-up (Triton compilation, caches): untimed
        return [sample_video(variant, noise(i, 0), text, steps, guidance, layers) for i, text in enumerate(texts)]

    dense = run(model, 0)
    # Per variant: (self-attention layers left dense, self-attention layers).
    runs, counts = {"dense": (1.0, dense)}, {}
    for name, topk_shown, options in (
        (CALIBRATED, None, {"profile": profile}),
        *(((BUDGET_TWIN, None, {"profile": twin}),) if twin is not None else ()),
        (SPARSE, topk, {**fixed, "quantized": False}),
        (UNTUNED, topk, fixed),
    ):
        patched = sagesla.patch(model, **options)
        counts[name] = (len(patched.dense_layers), len(patched.replaced) + len(patched.dense_layers))
        runs[name] = (topk_shown, run(model, counts[name][1]))
        sagesla.unpatch(model)
    counts["dense"] = (counts[CALIBRATED][1],) * 2
    if finetune is not None:
        counts[FINETUNED] = (0, tuned_layers)
        runs[FINETUNED] = (topk, run(tuned, tuned_layers))

    variants = [
        _summary(name, k, samples, None if name == "dense" else dense, counts[name])
        for name, (k, samples) in runs.items()
    ]
    calibrated = runs[CALIBRATED][1]
    results = [
        PromptResult(
            prompt,
            d.ms_per_step,
            s.ms_per_step,
            s.sparsity,
            metrics.psnr(s.video, d.video),
            metrics.ssim(s.video, d.video),
        )
        for prompt, d, s in zip(prompts, dense, calibrated, strict=True)
    ]
    _write_pictures(out, [dense, calibrated] + ([runs[FINETUNED][1]] if finetune is not None else []))
    device_name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    report = run_header(
        device_name,
        trained_weights=weights is not None,
        steps=steps,
        guidance=guidance,
        calibration=str(calibration),
        profile_selection=asdict(profile.selection),
        budget_twin_selection=None if twin is None else asdict(twin.selection),
        finetune=None if finetune is None else asdict(finetune),
        results=[asdict(r) for r in results],
        variants=[asdict(v) for v in variants],
    )
    write_text_atomic(out / "report.json", json.dumps(report, indent=1))
    return VideoDemo(results, variants, weights is not None, finetune, calibration)


def _calibrate_here(
    model: nn.Module,
    inputs: list[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    calibration: Calibration,
    progress: bool,
) -> tuple[Profile, Profile | None]:
    """(the profile ``calibration`` asks for, calibrated on ``inputs``; with a target PSNR, its per-layer budget
    twin at the same target, judged on the same videos, else None)."""
    import sagesla
    from sagesla.calibration import OutputJudge, budget_at_quality, calibrate

    common = {"steps": steps, "buckets": calibration.buckets, "progress": progress}
    if calibration.budget is not None:
        return calibrate(model, inputs, budget=calibration.budget, **common), None
    # Judged on the videos, as the PSNR column measures them.
    profile = calibrate(model, inputs, target_psnr=calibration.target_psnr, decode=_videos, **common)
    sagesla.patch(model, topk=1.0)
    try:
        judge = OutputJudge(model, inputs, steps=steps, decode=_videos)
        twin = budget_at_quality(profile.measurements, judge, calibration.target_psnr, progress=progress).profile
    finally:
        sagesla.unpatch(model)
    return profile, twin


def _psnr_cell(psnr_db: float) -> str:
    """A PSNR cell: "inf" for identical videos (``metrics.psnr`` gives them its largest value), else dB."""
    return "inf" if psnr_db >= _IDENTICAL_DB else f"{psnr_db:.2f}"


def _topk_cell(variant: VariantResult) -> str:
    if variant.topk is not None:
        return f"{variant.topk:g}"
    if variant.layers and variant.dense_layers == variant.layers:
        return f"1.0 everywhere: all {variant.layers} layers dense"
    if variant.dense_layers:
        return f"per layer, {variant.dense_layers} of {variant.layers} layers dense"
    return "per layer"


def format_results(results: list[PromptResult]) -> str:
    """The per-prompt table: dense against SageSLA at the calibrated profile."""
    return markdown_table(
        ["prompt", "dense ms/step", "SageSLA ms/step", "sparsity", "PSNR dB", "SSIM"],
        [
            [
                r.prompt,
                f"{r.dense_ms_per_step:.1f}",
                f"{r.sla_ms_per_step:.1f}",
                f"{r.sparsity:.1%}",
                _psnr_cell(r.psnr_db),
                f"{r.ssim:.4f}",
            ]
            for r in results
        ],
    )


def format_headline(variants: list[VariantResult]) -> str:
    """One line: the calibrated and the fine-tuned variants' sparsity and quality (those of them that ran)."""
    parts = [
        f"{v.name} {v.sparsity:.1%} sparse at {_psnr_cell(v.psnr_db)} dB PSNR, SSIM {v.ssim:.3f}"
        for v in variants
        if v.name in (CALIBRATED, FINETUNED)
    ]
    return "headline: " + "; ".join(parts)


def format_variants(variants: list[VariantResult]) -> str:
    """The summary table: one row per variant, means over the prompts."""
    return markdown_table(
        ["variant", "topk", "ms/step", "sparsity", "PSNR dB", "SSIM"],
        [
            [
                v.name,
                _topk_cell(v),
                f"{v.ms_per_step:.1f}",
                f"{v.sparsity:.1%}",
                "-" if v.psnr_db is None else _psnr_cell(v.psnr_db),
                "-" if v.ssim is None else f"{v.ssim:.4f}",
            ]
            for v in variants
        ],
    )
