"""The ``sagesla`` command line: ``sagesla demo``, ``sagesla calibrate``, ``sagesla bench-e2e`` (``sagesla.e2e``),
``sagesla convert-turbodiffusion`` (``sagesla.turbodiffusion``).

``sagesla demo`` runs the video demo (``sagesla.embedded.demo``) when the embedded model's trained weights are
shipped, the attention demo (``sagesla.demo``) otherwise; ``--video`` / ``--attention`` choose.

Every command checks all its arguments and output paths before its long work (model loading, calibration,
sampling, timing): a user error is one line on stderr, ``<prog>: error: <argument>: <what is wrong>``, and exit
status 2. The argument types below (``positive_int``, ``topk``, ``input_file``, ``output_file``, ``device``, ...)
are shared by every command; checks that need several arguments or a file's contents raise ``UsageError`` before
the long work, and ``reported_as`` turns a library's ValueError / TypeError / OSError about an argument into one.
"""

import argparse
import contextlib
import json
import math
import pathlib
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

import torch
from safetensors import SafetensorError

from sagesla import files

# torch.manual_seed takes seeds in [-2**63, 2**64); commands add small offsets (one per prompt) to theirs.
SEED_LIMIT = 2**63


class UsageError(argparse.ArgumentError):
    """A user error found after parsing (several arguments together, a file's contents): one line, exit status 2."""

    def __init__(self, message: str):
        super().__init__(None, message)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with every error one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message: str) -> str:
    """``message`` on one line: its lines joined with "; "."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


@contextlib.contextmanager
def reported_as(argument: str) -> Iterator[None]:
    """Turn a ValueError, TypeError or OSError raised inside (a library rejecting what ``argument`` gave: a file's
    contents, a model that does not fit) into a ``UsageError`` naming ``argument``; so is safetensors' error for a
    file it cannot read. Other errors pass unchanged."""
    try:
        yield
    except (ValueError, TypeError, OSError, SafetensorError) as error:
        raise UsageError(f"{argument}: {one_line(error)}") from error


def run_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``args.run(args)``; a ``UsageError`` is reported as ``parser`` reports its own (one line, exit status 2)."""
    try:
        return args.run(args)
    except UsageError as error:
        command = getattr(args, "command", None)
        prog = f"{parser.prog} {command}" if command else parser.prog
        parser.exit(2, f"{prog}: error: {one_line(error)} (see {prog} --help)\n")


def integer(low: int, high: int | None = None, accepted: str | None = None) -> Callable[[str], int]:
    """An argparse type: an int in [low, high) (no upper bound for None), described as ``accepted``."""
    accepted = accepted or (f"an int >= {low}" if high is None else f"an int in [{low}, {high})")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}")
        return value

    parse.__name__ = accepted
    return parse


def number(accepted: str, accepts: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a float for which ``accepts`` holds (NaN never does), described as ``accepted``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}") from None
        if math.isnan(value) or not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}")
        return value

    parse.__name__ = accepted
    return parse


positive_int = integer(1)
non_negative_int = integer(0)
seed = integer(0, SEED_LIMIT, "an int in [0, 2**63)")
topk = number("a number in (0, 1] (the fraction of key blocks kept)", lambda x: 0 < x <= 1)
budget = number("a finite number >= 0", lambda x: 0 <= x < math.inf)
guidance = number("a finite number >= 1 (1: no guidance)", lambda x: 1 <= x < math.inf)
positive_number = number("a finite number > 0", lambda x: 0 < x < math.inf)
fraction = number("a number in [0, 1)", lambda x: 0 <= x < 1)


def input_file(text: str) -> str:
    """An argparse type: an existing file."""
    path = pathlib.Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, want a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no file {text!r}")
    return text


def input_path(text: str) -> str:
    """An argparse type: an existing file or folder."""
    if not pathlib.Path(text).exists():
        raise argparse.ArgumentTypeError(f"no file or folder {text!r}")
    return text


def output_file(text: str) -> str:
    """An argparse type: a file path that can be written (``files.check_output_path``)."""
    try:
        files.check_output_path(text)
    except OSError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def output_folder(text: str) -> str:
    """An argparse type: a folder that exists or can be created, and written into."""
    try:
        files.check_output_path(text, folder=True)
    except OSError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def diffusers_folder(text: str) -> str:
    """An argparse type: a local diffusers transformer folder (``config.json``), or a pipeline folder holding one in
    ``transformer/``; returns the transformer folder."""
    folder = pathlib.Path(text)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        where = "no such folder" if not folder.is_dir() else "no config.json there or in transformer/"
        raise argparse.ArgumentTypeError(f"{text!r}: {where} (want a local diffusers transformer or pipeline folder)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise argparse.ArgumentTypeError(f"{str(folder / 'config.json')!r} is not readable JSON: {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
        raise argparse.ArgumentTypeError(f"{str(folder / 'config.json')!r} names no diffusers `_class_name`")
    return str(folder)


def device(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N``, present on this machine."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here (torch {torch.__version__})")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return text


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    from sagesla.embedded.demo import (
        CALIBRATED,
        Calibration,
        format_headline,
        format_results,
        format_variants,
        run_video_demo,
    )
    from sagesla.embedded.model import WEIGHTS, load
    from sagesla.profile import load_profile

    with reported_as("argument --out"):
        files.check_output_path(args.out, folder=True)
    if args.buckets is not None and args.target_psnr is None and args.budget is None:
        raise UsageError(
            f"argument --buckets: applies to a calibration here (--target-psnr or --budget), got {args.buckets}"
        )
    if args.buckets is not None and args.buckets > args.steps:
        raise UsageError(f"argument --buckets: must be at most --steps ({args.steps}), got {args.buckets}")
    weights = _shipped(
        args.weights, WEIGHTS, "no trained weights (scripts/train_tiny.py writes them): random weights, noise videos"
    )
    sla_weights = _shipped(
        args.sla_weights,
        finetuned.SLA_WEIGHTS,
        "no fine-tune file (scripts/finetune_tiny.py writes it): no fine-tuned variant",
    )
    # The files' contents, before the calibration: the weights must build the model, the fine-tune must be one.
    if weights is not None:
        with reported_as("argument --weights"):
            load(weights, "cpu")
    if sla_weights is not None:
        with reported_as("argument --sla-weights"):
            finetuned.read(sla_weights)
    calibration = None
    if args.profile is not None:
        with reported_as("argument --profile"):
            load_profile(args.profile)
        calibration = Calibration(profile=pathlib.Path(args.profile))
    elif args.target_psnr is not None or args.budget is not None:
        calibration = Calibration(target_psnr=args.target_psnr, budget=args.budget, buckets=args.buckets or 1)
    print(f"SageSLA video demo: the embedded model, {args.steps} denoising steps per prompt, device {device}")
    demo = run_video_demo(
        args.out,
        weights=weights,
        sla_weights=sla_weights,
        steps=args.steps,
        guidance=args.guidance,
        calibration=calibration,
        seed=args.seed,
        device=device,
    )
    print(f"SageSLA, calibrated: {demo.calibration}")
    print(format_results(demo.prompts))
    print()
    print(format_variants(demo.variants))
    if not demo.trained:
        print("note: random weights: these videos are noise, and so are their PSNR and SSIM")
    calibrated = next((v for v in demo.variants if v.name == CALIBRATED), None)
    if calibrated is not None and calibrated.dense_layers:
        every = calibrated.dense_layers == calibrated.layers
        print(
            f"note: the calibrated profile keeps every key block in {calibrated.dense_layers} of {calibrated.layers} "
            "layers, which run diffusers' attention"
            + (f": '{CALIBRATED}' is the dense model (a lower --target-psnr may allow sparsity)" if every else "")
        )
    if device == "cpu":
        print("note: on a CPU the SLA variants run the PyTorch reference path: their ms/step are not a speed result")
    print(format_headline(demo.variants))
    columns = "dense | SageSLA calibrated" + (" | SageSLA fine-tuned" if demo.finetune is not None else "")
    print(f"wrote {args.out}/demo.gif ({columns}), frames.png, profile.png, profile.safetensors, report.json")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sagesla.demo import format_rows, run_attention_demo
    from sagesla.embedded.model import WEIGHTS

    device = args.device or default_device()
    video_files = args.weights is not None or args.sla_weights is not None
    if args.video or (not args.attention and (video_files or WEIGHTS.is_file())):
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


def _convert_turbodiffusion(args: argparse.Namespace) -> int:
    from sagesla import turbodiffusion

    with reported_as("argument OUT_DIR"):
        turbodiffusion.check_out_dir(args.out_dir)
    with reported_as("argument --config"):
        config = turbodiffusion.read_config(args.config)
    with reported_as("argument CHECKPOINT"):
        report = turbodiffusion.convert_turbodiffusion(
            args.checkpoint, args.out_dir, config=config, dtype=turbodiffusion.DTYPES[args.dtype]
        )
    print(report)
    folder = json.dumps(str(args.out_dir))
    print(
        "next steps (TurboDiffusion samples at topk 0.1, 0.15 for better quality):\n"
        f"  model = diffusers.WanTransformer3DModel.from_pretrained({folder}, torch_dtype=torch.{args.dtype})\n"
        "  sagesla.patch(model, topk=0.1)\n"
        f"  sagesla.load_sla_weights(model, {folder})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sagesla import e2e, turbodiffusion
    from sagesla.calibration import cli as calibration_cli

    parser = ArgumentParser(prog="sagesla", description="Quantized Sparse-Linear Attention for video DiTs")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="SageSLA against dense attention: the embedded video model (when trained) or video-like Q/K/V"
    )
    which = demo.add_mutually_exclusive_group()
    which.add_argument("--video", action="store_true", help="the video demo, with random weights if untrained")
    which.add_argument("--attention", action="store_true", help="the attention demo on synthetic Q/K/V")
    demo.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--seed", type=seed, default=0)
    video = demo.add_argument_group("video demo (the default when the embedded model's weights are shipped)")
    video.add_argument(
        "--weights", type=input_file, default=None, help="weights from scripts/train_tiny.py (default: the shipped)"
    )
    video.add_argument(
        "--sla-weights",
        type=input_file,
        default=None,
        help="the SLA fine-tune from scripts/finetune_tiny.py (default: the shipped, if any)",
    )
    video.add_argument("--steps", type=positive_int, default=10, help="denoising steps")
    video.add_argument("--guidance", type=guidance, default=1.0, help="classifier-free guidance scale (1: none)")
    calibrated = video.add_mutually_exclusive_group()
    calibrated.add_argument(
        "--profile", type=input_file, help="the calibrated variant's profile (default: the shipped weights' own)"
    )
    calibrated.add_argument(
        "--target-psnr",
        type=positive_number,
        help="instead: calibrate here to this output PSNR in dB (35 without a profile)",
    )
    calibrated.add_argument("--budget", type=budget, help="instead: calibrate here within this worst rel-L1 per layer")
    video.add_argument(
        "--buckets", type=positive_int, default=None, help="with --target-psnr / --budget: timestep buckets (1)"
    )
    video.add_argument("--out", default="sagesla-demo", help="output folder")
    attention = demo.add_argument_group("attention demo (--attention)")
    attention.add_argument("--topk", type=topk, nargs="+", default=[0.05, 0.1, 0.2, 0.5])
    attention.add_argument("--heads", type=positive_int, default=4)
    attention.add_argument("--frames", type=positive_int, default=8)
    attention.add_argument("--height", type=positive_int, default=24)
    attention.add_argument("--width", type=positive_int, default=32)
    attention.add_argument("--head-dim", type=positive_int, default=64)
    attention.add_argument("--repeats", type=positive_int, default=3)
    demo.set_defaults(run=_demo)
    calibration_cli.add_parser(sub)
    bench = sub.add_parser("bench-e2e", help="time whole denoising steps of Wan-shaped models, dense vs SageSLA")
    e2e.add_arguments(bench)
    bench.set_defaults(run=e2e.run)
    convert = sub.add_parser(
        "convert-turbodiffusion",
        help="a TurboDiffusion Wan checkpoint (.pth, -quant too) as a diffusers folder with its SLA weights",
    )
    convert.add_argument("checkpoint", metavar="CHECKPOINT", type=input_file, help="TurboDiffusion .pth / .pt")
    convert.add_argument("out_dir", metavar="OUT_DIR", type=output_folder, help="new (or empty) folder to write")
    convert.add_argument(
        "--config",
        metavar="DIFFUSERS_CONFIG",
        type=input_path,
        default=None,
        help="a diffusers config.json (or its folder) for what the weights' shapes leave open (custom models)",
    )
    convert.add_argument("--dtype", choices=tuple(turbodiffusion.DTYPES), default="bfloat16")
    convert.set_defaults(run=_convert_turbodiffusion)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_parsed(parser, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
