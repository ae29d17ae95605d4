"""Video quality of the embedded model with its block linears quantized by ``sagesla.quantize_linear``, against
dense, alone and under SageSLA.

The embedded model (``sagesla.embedded.model``, trained weights; 6 blocks of 256 features, MLP 640, so every block
linear passes the default ``min_features=128`` and only SLA's 64 x 64 ``proj_l`` stays exact) samples each prompt
from the same noise (``calibration.sampling.denoise``, as ``sagesla demo`` does) as:
- dense: the model as trained;
- int8 / fp8: the block linears quantized (torchao W8A8 int8; FP8 e4m3 with per-row scales where the GPU and the
  bf16 weights take it, else its row says why not);
- SageSLA: ``sagesla.patch`` at ``--topk`` (zero ``proj_l``: the trained model has no linear branch), linears exact;
- SageSLA + int8 / fp8: both.
Every variant is a copy of the dense model, so the rows differ only by what their names say. PSNR and SSIM are
against the dense video of the same prompt (``sagesla.metrics``, videos in [-1, 1]); ms/step is the wall-clock of
one denoising step after a warm-up step (on this 2048-token model it shows the per-call cost of dynamic activation
quantization, not what it saves on a Wan-sized one). The model runs bf16 on CUDA (the precision FP8 takes) and
fp32 on CPU (int8 only; a couple of minutes on 2 cores).

Usage:
    python scripts/quantized_linear_quality.py [--steps 10] [--topk 0.5]
        [--prompt "red circle moves right, camera still" ...] [--device cuda] [--seed 0] [--out-dir benchmarks/results]

Writes ``<out-dir>/<gpu>-quantized-linear.{json,md}`` and prints the tables.
"""

import argparse
import copy
import dataclasses
import pathlib
import statistics

import torch
from torch import nn

import sagesla
from sagesla import cli, metrics
from sagesla.embedded.demo import DEMO_PROMPTS, sample_video
from sagesla.embedded.model import LATENT_SHAPE, WEIGHTS, load
from sagesla.embedded.videos import PROMPTS
from sagesla.quantized_linear import quantize_linear
from sagesla.tables import gpu_tag, markdown_table, run_header, write_report

MODES = ("int8", "fp8")
QUALITY = ("psnr_db", "ssim", "psnr_vs_exact_db", "ssim_vs_exact")
QUALITY_HEADERS = ("PSNR dB", "SSIM", "PSNR dB vs exact linears", "SSIM vs exact linears")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to run the model: its linear layers' precision and its attention."""

    name: str
    linear: str  # "exact", "int8" or "fp8"
    topk: float | None  # SageSLA's; None: dense attention
    quantized_layers: int = 0
    parameter_mib: float = 0.0


@dataclasses.dataclass(frozen=True)
class PromptRow:
    """One variant's video of one prompt against dense's, and against the same attention with exact linears (the
    quantization's own share; for int8 / fp8 alone that is dense again)."""

    variant: str
    linear: str
    prompt: str
    psnr_db: float
    ssim: float
    psnr_vs_exact_db: float
    ssim_vs_exact: float
    ms_per_step: float


def _to_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with every floating parameter in ``dtype`` (``denoise`` feeds the latents in the first one's dtype,
    Wan's ``scale_shift_table``); buffers (RoPE's tables) stay fp32. Tensor by tensor: ``ModelMixin.to`` would warn
    about the modules diffusers keeps in fp32."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)
    return model


def _build(dense: nn.Module, linear: str, topk: float | None) -> tuple[nn.Module, int, int]:
    """(a copy of ``dense`` with SageSLA at ``topk`` and its linears quantized to ``linear``, quantized layer count,
    parameter bytes). Raises NotImplementedError where ``linear="fp8"`` cannot run."""
    model = copy.deepcopy(dense)
    if topk is not None:
        sagesla.patch(model, topk=topk)
    if linear == "exact":
        return model, 0, sum(p.numel() * p.element_size() for p in model.parameters())
    report = quantize_linear(model, linear)
    return model, len(report.quantized), report.bytes_after


def _variants(topk: float) -> list[tuple[str, str, float | None]]:
    """(name, linear precision, SageSLA topk) of every variant, dense first."""
    sla = f"SageSLA topk {topk:g}"
    return (
        [("dense", "exact", None)]
        + [(mode, mode, None) for mode in MODES]
        + [(sla, "exact", topk)]
        + [(f"{sla} + {mode}", mode, topk) for mode in MODES]
    )


def _cells(rows: list[PromptRow], exact_linears: bool) -> list[str]:
    """PSNR and SSIM means of ``rows`` against dense, then against exact linears ("-" for a variant that has them)."""
    means = [statistics.mean(getattr(row, key) for row in rows) for key in QUALITY]
    cells = [f"{psnr:.2f}" if i % 2 == 0 else f"{psnr:.4f}" for i, psnr in enumerate(means)]
    return cells[:2] + ["-", "-"] if exact_linears else cells


def _summary_table(variants: list[Variant], rows: list[PromptRow], skipped: dict[str, str]) -> str:
    """Per variant: means over the prompts; the variants not run, with why, under the table."""

    def cells(variant: Variant) -> list[str]:
        mine = [row for row in rows if row.variant == variant.name]
        quality = ["-"] * 4 if variant.name == "dense" else _cells(mine, variant.linear == "exact")
        attention = "dense" if variant.topk is None else f"SageSLA topk {variant.topk:g}"
        linear = variant.linear if variant.linear == "exact" else f"{variant.linear} ({variant.quantized_layers})"
        ms = statistics.mean(row.ms_per_step for row in mine)
        return [variant.name, linear, attention, f"{variant.parameter_mib:.1f}", f"{ms:.1f}", *quality]

    headers = ["variant", "linear (layers)", "attention", "params MiB", "ms/step", *QUALITY_HEADERS]
    notes = "".join(f"\n- {name}: {why}" for name, why in skipped.items())
    return markdown_table(headers, [cells(v) for v in variants]) + ("\n" + notes if notes else "")


def _prompt_table(rows: list[PromptRow]) -> str:
    """Per variant and prompt (dense left out: it is the reference)."""
    body = [[row.variant, row.prompt, *_cells([row], row.linear == "exact")] for row in rows if row.variant != "dense"]
    return markdown_table(["variant", "prompt", *QUALITY_HEADERS], body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=cli.positive_int, default=10, help="denoising steps")
    parser.add_argument("--topk", type=cli.topk, default=0.5, help="SageSLA's topk")
    parser.add_argument("--prompt", action="append", choices=PROMPTS, help="repeatable (default: the demo's three)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--seed", type=cli.seed, default=0, help="noise seed of the first prompt")
    parser.add_argument("--out-dir", type=cli.output_folder, default="benchmarks/results")
    args = parser.parse_args()
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"--device: not a torch device: {args.device!r}")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device: must be cpu or a CUDA device torch sees, got {args.device!r}")
    prompts = tuple(args.prompt or DEMO_PROMPTS)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dense, embed = load(WEIGHTS, device)
    dense = _to_dtype(dense, dtype)
    with torch.no_grad():
        texts = [embed([prompt]) for prompt in prompts]
    noises = [
        torch.randn(1, *LATENT_SHAPE, generator=torch.Generator().manual_seed(args.seed + i)).to(device)
        for i in range(len(prompts))
    ]

    variants, rows, skipped, videos = [], [], {}, {}
    for name, linear, topk in _variants(args.topk):
        try:
            model, layers, parameter_bytes = _build(dense, linear, topk)
        except NotImplementedError as error:
            skipped[name] = f"not run: {error}"
            continue
        variants.append(Variant(name, linear, topk, layers, parameter_bytes / 2**20))
        sample_video(model, noises[0], texts[0], 1)  # warm-up (Triton compilation, caches): untimed
        for prompt, noise, text in zip(prompts, noises, texts, strict=True):
            sampled = sample_video(model, noise, text, args.steps)
            video, ms = sampled.video, sampled.ms_per_step
            # Dense runs first, and each attention with exact linears before its quantized variants.
            reference = videos.setdefault((prompt, None), video)
            exact = videos.setdefault((prompt, topk), video)
            quality = [f(video, ref) for ref in (reference, exact) for f in (metrics.psnr, metrics.ssim)]
            rows.append(PromptRow(name, linear, prompt, *quality, ms))
        print(f"{name}: {statistics.mean(row.ms_per_step for row in rows[-len(prompts) :]):.1f} ms/step")
        del model

    import torchao

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = run_header(
        device_name,
        torchao=torchao.__version__,
        dtype=str(dtype).removeprefix("torch."),
        steps=args.steps,
        topk=args.topk,
        seed=args.seed,
    )
    markdown = _summary_table(variants, rows, skipped) + "\n\n" + _prompt_table(rows)
    print(markdown)
    payload = {
        "variants": [dataclasses.asdict(v) for v in variants],
        "not_run": skipped,
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    write_report(pathlib.Path(args.out_dir) / f"{gpu_tag(device_name)}-quantized-linear", header, payload, markdown)


if __name__ == "__main__":
    main()
