"""The ``sagesla`` command line: ``sagesla demo``, ``sagesla calibrate``."""

import argparse
import sys

import torch

from sagesla.calibration import cli as calibration_cli


def _demo(args: argparse.Namespace) -> int:
    from sagesla.demo import format_rows, run_attention_demo

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    demo.set_defaults(run=_demo)
    calibration_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
