"""The ``sagesla`` command line: ``sagesla demo``, ``sagesla calibrate``, ``sagesla bench-e2e`` (``sagesla.e2e``).

``sagesla demo`` runs the video demo (``sagesla.embedded.demo``) when the embedded model's trained weights are
shipped, the attention demo (``sagesla.demo``) otherwise; ``--video`` / ``--attention`` choose.
"""

import argparse
import pathlib
import sys

import torch

from sagesla import e2e
from sagesla.calibration import cli as calibration_cli


def _shipped(given: str | None, shipped: pathlib.Path, what: str) -> str | pathlib.Path | None:
    """The path given, else the shipped file if it exists (None, with a note, if not)."""
    if given is not None:
        return given
    if shipped.is_file():
        return shipped
    print(f"note: {what} ({shipped} is not there)")
    return None


def _video_demo(args: argparse.Namespace, device: str) -> int:
    from sagesla.embedded import finetuned
    from sagesla.embedded.demo import format_results, format_variants, run_video_demo
    from sagesla.embedded.model import WEIGHTS

    weights = _shipped(
        args.weights, WEIGHTS, "no trained weights (scripts/train_tiny.py writes them): random weights, noise videos"
    )
    sla_weights = _shipped(
        args.sla_weights,
        finetuned.SLA_WEIGHTS,
        "no fine-tune file (scripts/finetune_tiny.py writes it): no fine-tuned variant",
    )
    print(f"SageSLA video demo: the embedded model, {args.steps} denoising steps per prompt, device {device}")
    demo = run_video_demo(
        args.out,
        weights=weights,
        sla_weights=sla_weights,
        steps=args.steps,
        guidance=args.guidance,
        budget=args.budget,
        seed=args.seed,
        device=device,
    )
    print(format_results(demo.prompts))
    print()
    print(format_variants(demo.variants))
    if not demo.trained:
        print("note: random weights: these videos are noise, and so are their PSNR and SSIM")
    columns = "dense | SageSLA calibrated" + (" | SageSLA fine-tuned" if demo.finetune is not None else "")
    print(f"wrote {args.out}/demo.gif ({columns}), frames.png, profile.png, profile.safetensors, report.json")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sagesla.demo import format_rows, run_attention_demo
    from sagesla.embedded.model import WEIGHTS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.video or (not args.attention and WEIGHTS.is_file()):
        return _video_demo(args, device)
    if not args.attention:
        print(f"note: no trained video model ({WEIGHTS} is not there): the attention demo (--video: random weights)")
    shape = f"B1 H{args.heads} L{args.frames * args.height * args.width} D{args.head_dim}"
    print(
        f"SageSLA attention demo: video-like Q/K/V ({args.frames}x{args.height}x{args.width} tokens, {shape}), "
        f"device {device}, torch {torch.__version__}"
    )
    rows = run_attention_demo(
        tuple(args.topk),
        heads=args.heads,
        frames=args.frames,
        height=args.height,
        width=args.width,
        head_dim=args.head_dim,
        device=device,
        repeats=args.repeats,
        seed=args.seed,
    )
    print(format_rows(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sagesla", description="Quantized Sparse-Linear Attention for video DiTs")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="SageSLA against dense attention: the embedded video model (when trained) or video-like Q/K/V"
    )
    which = demo.add_mutually_exclusive_group()
    which.add_argument("--video", action="store_true", help="the video demo, with random weights if untrained")
    which.add_argument("--attention", action="store_true", help="the attention demo on synthetic Q/K/V")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--seed", type=int, default=0)
    video = demo.add_argument_group("video demo (the default when the embedded model's weights are shipped)")
    video.add_argument("--weights", default=None, help="weights from scripts/train_tiny.py (default: the shipped)")
    video.add_argument(
        "--sla-weights", default=None, help="proj_l from scripts/finetune_tiny.py (default: the shipped, if any)"
    )
    video.add_argument("--steps", type=int, default=10, help="denoising steps")
    video.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    video.add_argument("--budget", type=float, default=0.05, help="calibration budget (worst rel-L1 per layer)")
    video.add_argument("--out", default="sagesla-demo", help="output folder")
    attention = demo.add_argument_group("attention demo (--attention)")
    attention.add_argument("--topk", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5])
    attention.add_argument("--heads", type=int, default=4)
    attention.add_argument("--frames", type=int, default=8)
    attention.add_argument("--height", type=int, default=24)
    attention.add_argument("--width", type=int, default=32)
    attention.add_argument("--head-dim", type=int, default=64)
    attention.add_argument("--repeats", type=int, default=3)
    demo.set_defaults(run=_demo)
    calibration_cli.add_parser(sub)
    bench = sub.add_parser("bench-e2e", help="time whole denoising steps of Wan-shaped models, dense vs SageSLA")
    e2e.add_arguments(bench)
    bench.set_defaults(run=e2e.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
