"""The ``sagesla`` command line: ``sagesla demo``, ``sagesla calibrate``."""

import argparse
import sys

import torch

from sagesla.calibration import cli as calibration_cli


def _video_demo(args: argparse.Namespace, device: str) -> int:
    from sagesla.embedded.demo import format_results, run_video_demo

    results, trained = run_video_demo(
        args.out, weights=args.weights, steps=args.steps, budget=args.budget, seed=args.seed, device=device
    )
    if not trained:
        print("note: no trained weights found (scripts/train_tiny.py writes them): the videos are noise")
    print(format_results(results))
    print(f"wrote {args.out}/demo.gif (dense | SageSLA), profile.png, profile.safetensors, report.json")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sagesla.demo import format_rows, run_attention_demo

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.video:
        return _video_demo(args, device)
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
    demo = sub.add_parser("demo", help="compare SageSLA with dense attention on video-like inputs")
    demo.add_argument("--topk", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5])
    demo.add_argument("--heads", type=int, default=4)
    demo.add_argument("--frames", type=int, default=8)
    demo.add_argument("--height", type=int, default=24)
    demo.add_argument("--width", type=int, default=32)
    demo.add_argument("--head-dim", type=int, default=64)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--repeats", type=int, default=3)
    demo.add_argument("--seed", type=int, default=0)
    video = demo.add_argument_group("video demo (--video): the embedded model, calibrated, dense vs SageSLA")
    video.add_argument("--video", action="store_true", help="sample the embedded video model instead")
    video.add_argument("--weights", default=None, help="weights from scripts/train_tiny.py (default: the shipped)")
    video.add_argument("--steps", type=int, default=10, help="denoising steps")
    video.add_argument("--budget", type=float, default=0.05, help="calibration budget (worst rel-L1 per layer)")
    video.add_argument("--out", default="sagesla-demo", help="output folder")
    demo.set_defaults(run=_demo)
    calibration_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
