"""``sagesla demo --video``: the embedded model sampled dense and with SageSLA, calibrated, compared, pictured.

Writes to an output folder: ``demo.gif`` (per prompt, dense | SageSLA side by side), ``profile.png`` (per-layer
topk, sparsity and error from the calibration), ``profile.safetensors`` and ``report.json``; returns the table.
"""

import json
import pathlib
import time
from dataclasses import asdict, dataclass

import torch

from sagesla import metrics
from sagesla.embedded.model import LATENT_SHAPE, TINY_VIDEO_CONFIG, build
from sagesla.embedded.videos import from_latent
from sagesla.tables import markdown_table

DEMO_PROMPTS = ("red circle moves right", "blue square moves up", "yellow circle moves left")
WEIGHTS = pathlib.Path(__file__).with_name("tiny-video.safetensors")


@dataclass(frozen=True)
class PromptResult:
    prompt: str
    dense_ms_per_step: float
    sla_ms_per_step: float
    sparsity: float
    psnr_db: float
    ssim: float


def load(weights: str | pathlib.Path | None, device: str, config: dict = TINY_VIDEO_CONFIG):
    """(transformer, prompt embedding, trained) from ``weights`` (default: the shipped file if present)."""
    from safetensors.torch import load_file

    model, prompts = build(config)
    path = pathlib.Path(weights) if weights is not None else WEIGHTS
    trained = path.is_file()
    if trained:
        state = load_file(path)
        for prefix, module in (("transformer.", model), ("prompts.", prompts)):
            module.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    elif weights is not None:
        raise FileNotFoundError(f"`weights` must be a file written by scripts/train_tiny.py, got {str(path)!r}")
    return model.to(device).eval(), prompts.to(device).eval(), trained


def _sample(model, noise: torch.Tensor, text: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """(video [3, F, S, S] in [-1, 1], ms per step)."""
    from sagesla.calibration.sampling import denoise

    if noise.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    latent = denoise(model, noise, text, steps)
    if noise.is_cuda:
        torch.cuda.synchronize()
    return from_latent(latent)[0].clamp(-1, 1), (time.perf_counter() - start) * 1e3 / steps


def _frames(dense: torch.Tensor, sla: torch.Tensor, scale: int = 4):
    """Pillow frames of dense | SageSLA, [3, F, S, S] each, magnified ``scale`` times."""
    from PIL import Image

    pair = torch.cat((dense, torch.full_like(dense[..., :2], 1.0), sla), dim=-1)  # a white bar between them
    pixels = ((pair.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    return [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in pixels]


def run_video_demo(
    out_dir: str | pathlib.Path,
    *,
    weights: str | pathlib.Path | None = None,
    prompts: tuple[str, ...] = DEMO_PROMPTS,
    steps: int = 10,
    budget: float = 0.05,
    seed: int = 0,
    device: str | None = None,
    config: dict = TINY_VIDEO_CONFIG,
    progress: bool = True,
) -> tuple[list[PromptResult], bool]:
    """Calibrate, patch and sample; returns (per-prompt results, whether trained weights were used).

    Calibration runs on the same prompts with other noise seeds; the compared samples use ``seed`` for both dense
    and SageSLA, so the videos differ only by the attention.
    """
    import sagesla
    from sagesla.calibration import calibrate, plot_profile

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, embed, trained = load(weights, device, config)
    with torch.no_grad():
        texts = [embed([p]) for p in prompts]

    def noise(index: int, offset: int) -> torch.Tensor:
        return torch.randn(1, *LATENT_SHAPE, generator=torch.Generator().manual_seed(seed + offset + index))

    profile = calibrate(
        model, [(noise(i, 1000), t) for i, t in enumerate(texts)], steps=steps, budget=budget, progress=progress
    )
    profile.save(out / "profile.safetensors")
    plot_profile(profile, str(out / "profile.png"))

    dense = [_sample(model, noise(i, 0), t, steps) for i, t in enumerate(texts)]
    sagesla.patch(model, profile=profile)
    sla, sparsity = [], []
    for i, text in enumerate(texts):
        sla.append(_sample(model, noise(i, 0), text, steps))
        skipped = [p.last_sparsity for p in model.attn_processors.values() if hasattr(p, "last_sparsity")]
        sparsity.append(sum(skipped) / max(len(skipped), 1))
    sagesla.unpatch(model)

    results, frames = [], []
    for prompt, (d, d_ms), (s, s_ms), sp in zip(prompts, dense, sla, sparsity, strict=True):
        results.append(PromptResult(prompt, d_ms, s_ms, sp, metrics.psnr(s, d), metrics.ssim(s, d)))
        frames += _frames(d, s)
    frames[0].save(out / "demo.gif", save_all=True, append_images=frames[1:], duration=120, loop=0)
    report = {"trained_weights": trained, "steps": steps, "budget": budget, "results": [asdict(r) for r in results]}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return results, trained


def format_results(results: list[PromptResult]) -> str:
    return markdown_table(
        ["prompt", "dense ms/step", "SageSLA ms/step", "sparsity", "PSNR dB", "SSIM"],
        [
            [
                r.prompt,
                f"{r.dense_ms_per_step:.1f}",
                f"{r.sla_ms_per_step:.1f}",
                f"{r.sparsity:.1%}",
                f"{r.psnr_db:.2f}",
                f"{r.ssim:.4f}",
            ]
            for r in results
        ],
    )
