"""``sagesla calibrate``: calibrate a Wan transformer from the command line and write its profile.

Models: ``--model tiny`` (the 2-block test model with random weights: a smoke run in seconds on CPU) or a local
diffusers folder (a transformer folder with ``config.json``, or a pipeline folder with ``transformer/``).
Inputs: ``--inputs FILE.safetensors`` holding ``text`` [N, T, text_dim] (prompt embeddings from the model's text
encoder) and optionally ``latents`` [N, C, F, H, W] (starting noise; drawn from ``--seed`` when absent), or by
default ``--prompts`` random inputs (noise and text embeddings from seeds ``--seed``, ``--seed + 1``, ...).
"""

import argparse
import importlib.util
import math
import os
from pathlib import Path

import torch

from sagesla import cli as arguments
from sagesla import validation
from sagesla.calibration.record import DEFAULT_CANDIDATES
from sagesla.calibration.sampling import DEFAULT_SHIFT
from sagesla.profile import METRICS

# (latent frames, height, width) and text tokens: the tiny model's smoke size (1024 tokens, 16 key blocks) and
# Wan2.1 at 480p, 81 frames (32760 tokens) with Wan's 512 text tokens.
TINY_SHAPE, TINY_TEXT = (4, 32, 32), 8
WAN_SHAPE, WAN_TEXT = (21, 60, 104), 512
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_source(text: str) -> str:
    """An argparse type: ``tiny`` or a local diffusers folder (``sagesla.cli.diffusers_folder``), as given."""
    if text != "tiny":
        arguments.diffusers_folder(text)
    return text


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``calibrate`` on the ``sagesla`` command's subparsers."""
    parser = subparsers.add_parser(
        "calibrate",
        help="choose per-layer topk within an error budget (or for an output PSNR) and write a profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=model_source, required=True, help="'tiny' or a local diffusers folder")
    parser.add_argument(
        "--sla-weights",
        type=arguments.input_path,
        help="SLA-finetuned proj_l to load (any source load_sla_weights reads)",
    )
    parser.add_argument(
        "--inputs",
        type=arguments.input_file,
        help="safetensors file with `text` [N, T, text_dim] and optional `latents`",
    )
    parser.add_argument(
        "--prompts", type=arguments.positive_int, default=2, help="random inputs when --inputs is not given"
    )
    parser.add_argument(
        "--latent-shape",
        type=arguments.positive_int,
        nargs=3,
        metavar=("F", "H", "W"),
        help="latent frames x h x w",
    )
    parser.add_argument("--text-len", type=arguments.positive_int, help="tokens of the random text embeddings")
    parser.add_argument("--seed", type=arguments.seed, default=0)
    parser.add_argument("--steps", type=arguments.positive_int, default=10, help="denoising steps per input")
    parser.add_argument(
        "--record-steps",
        type=arguments.non_negative_int,
        nargs="+",
        help="indices of the steps measured (default all)",
    )
    parser.add_argument(
        "--shift",
        type=arguments.positive_number,
        default=DEFAULT_SHIFT,
        help="flow shift (Wan: 3 at 480p, 5 at 720p)",
    )
    goal = parser.add_mutually_exclusive_group()
    goal.add_argument("--budget", type=arguments.budget, default=0.05, help="bound on the worst error of every call")
    goal.add_argument("--target-sparsity", type=arguments.fraction, help="instead of --budget: mean sparsity to reach")
    goal.add_argument(
        "--target-psnr",
        type=arguments.positive_number,
        help="instead of --budget: output PSNR (dB) to reach, judged by sampling the inputs again",
    )
    parser.add_argument("--metric", choices=METRICS, default="rel_l1", help="rel_l1, or cosine (1 - cosine)")
    parser.add_argument(
        "--topk-grid", type=arguments.topk, nargs="+", default=list(DEFAULT_CANDIDATES), help="candidates"
    )
    parser.add_argument("--per-head", action="store_true", help="the budget holds in every head")
    parser.add_argument(
        "--buckets", type=arguments.positive_int, default=1, help="timestep buckets with their own topk"
    )
    parser.add_argument("--backend", choices=validation.BACKENDS, default="auto")
    parser.add_argument("--unquantized", action="store_true", help="calibrate SLA without INT8/FP8 quantization")
    parser.add_argument("--device", type=arguments.device, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument(
        "--out", type=arguments.output_file, default="profile.safetensors", help="the profile file to write"
    )
    parser.add_argument(
        "--plot", type=arguments.output_file, help="also write a PNG of topk, sparsity and error per layer"
    )
    parser.set_defaults(run=run)


def model_config(source: str) -> dict:
    """The config of ``--model`` (``tiny``: ``TINY_WAN_CONFIG``; a folder: its ``config.json``), read without
    building the model."""
    import json

    if source == "tiny":
        from sagesla.wan_shapes import TINY_WAN_CONFIG

        return dict(TINY_WAN_CONFIG)
    return json.loads((Path(arguments.diffusers_folder(source)) / "config.json").read_text())


def load_model(source: str, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """The tiny test model (random weights from ``seed``) or a diffusers model from a local folder, in eval mode."""
    if source == "tiny":
        from sagesla.wan_shapes import tiny_wan_transformer

        torch.manual_seed(seed)
        model = tiny_wan_transformer().to(device)
        # diffusers warns on any dtype cast of a Wan model; the tiny one is built in float32.
        return model if dtype == torch.float32 else model.to(dtype)
    import diffusers

    folder = Path(arguments.diffusers_folder(source))
    class_name = model_config(source)["_class_name"]
    if not hasattr(diffusers, class_name):
        raise ValueError(f"{str(folder)!r}: its config names `_class_name` {class_name!r}, which diffusers lacks")
    return getattr(diffusers, class_name).from_pretrained(folder, torch_dtype=dtype).to(device).eval()


def check_arguments(args: argparse.Namespace, config: dict) -> None:
    """The checks that need several arguments or the model's config. Raises ``sagesla.cli.UsageError``."""
    if args.record_steps is not None and max(args.record_steps) >= args.steps:
        raise arguments.UsageError(
            f"argument --record-steps: must be step indices in [0, {args.steps}) (--steps {args.steps}), "
            f"got {args.record_steps}"
        )
    recorded = len(set(args.record_steps)) if args.record_steps is not None else args.steps
    if args.buckets > recorded:
        raise arguments.UsageError(
            f"argument --buckets: must be in [1, {recorded}] (the recorded steps), got {args.buckets}"
        )
    if args.target_psnr is not None and args.per_head:
        raise arguments.UsageError(
            "argument --per-head: applies to the budget rule, not with --target-psnr (which allocates per layer)"
        )
    if args.plot is not None and os.path.abspath(args.plot) == os.path.abspath(args.out):
        raise arguments.UsageError(f"argument --plot: must differ from --out, got {args.plot!r} for both")
    if args.backend == "triton":
        device = torch.device(args.device or arguments.default_device())
        if importlib.util.find_spec("triton") is None:
            raise arguments.UsageError("argument --backend: 'triton' needs triton installed (use auto or torch)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise arguments.UsageError(
                f"argument --backend: 'triton' needs a CUDA device (or TRITON_INTERPRET=1), got device {device}"
            )
    if args.latent_shape is not None:
        _check_latent_shape("argument --latent-shape", tuple(args.latent_shape), config)


def _check_latent_shape(argument: str, shape: tuple[int, ...], config: dict) -> None:
    """(F, H, W) must be multiples of the model's patch and within its rotary table."""
    patch = tuple(config.get("patch_size", (1, 1, 1)))
    if len(patch) != 3 or any(size % step for size, step in zip(shape, patch, strict=True)):
        raise arguments.UsageError(
            f"{argument}: latent frames x height x width must be multiples of the model's patch_size "
            f"{list(patch)}, got {list(shape)}"
        )
    limit = config.get("rope_max_seq_len")
    if limit is not None and max(size // step for size, step in zip(shape, patch, strict=True)) > limit:
        raise arguments.UsageError(
            f"{argument}: the model's rotary table holds {limit} positions per axis (rope_max_seq_len), got latent "
            f"{list(shape)} over patch_size {list(patch)}"
        )


def make_inputs(args: argparse.Namespace, config: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(latents [1, C, F, H, W], text [1, T, text_dim]) per prompt, from ``--inputs`` or seeded noise.

    ``config`` is the model's (``model_config``); every tensor is checked against it. Raises
    ``sagesla.cli.UsageError`` naming ``--inputs`` for a file that does not fit.
    """
    tiny = args.model == "tiny"
    shape = tuple(args.latent_shape or (TINY_SHAPE if tiny else WAN_SHAPE))
    channels, text_dim = config.get("in_channels", 16), config.get("text_dim", 4096)
    latent_shape = (1, channels, *shape)
    if args.inputs:
        from safetensors.torch import load_file

        with arguments.reported_as(f"argument --inputs: {args.inputs!r} is not a readable safetensors file"):
            stored = load_file(args.inputs)
        where = f"argument --inputs: {args.inputs!r}"
        text = stored.get("text")
        if text is None or text.dim() != 3 or not text.is_floating_point() or text.shape[0] < 1:
            found = "none" if text is None else f"{text.dtype} {tuple(text.shape)}"
            raise arguments.UsageError(f"{where} must hold a float `text` [N, T, {text_dim}], got {found}")
        if text.shape[2] != text_dim:
            raise arguments.UsageError(
                f"{where}: `text` {tuple(text.shape)} must end in the model's text_dim {text_dim}"
            )
        texts = list(text.split(1))
        latents = [None] * len(texts)
        if "latents" in stored:
            noise = stored["latents"]
            if noise.dim() != 5 or not noise.is_floating_point() or noise.shape[:2] != (len(texts), channels):
                raise arguments.UsageError(
                    f"{where}: `latents` must be float [N={len(texts)}, C={channels}, F, H, W] (N as `text`, C the "
                    f"model's in_channels), got {noise.dtype} {tuple(noise.shape)}"
                )
            _check_latent_shape(f"{where}: `latents`", tuple(noise.shape[2:]), config)
            latents = list(noise.split(1))
    else:
        text_shape = (1, args.text_len or (TINY_TEXT if tiny else WAN_TEXT), text_dim)
        texts = [
            torch.randn(text_shape, generator=torch.Generator().manual_seed(args.seed + i)) for i in range(args.prompts)
        ]
        latents = [None] * args.prompts
    return [
        (
            torch.randn(latent_shape, generator=torch.Generator().manual_seed(args.seed + i))
            if noise is None
            else noise,
            text,
        )
        for i, (noise, text) in enumerate(zip(latents, texts, strict=True))
    ]


def run(args: argparse.Namespace) -> int:
    """Calibrate, print the summary table, write the profile (and the plot)."""
    import sagesla
    from sagesla.calibration import calibrate, plot_profile, summary
    from sagesla.settings import SLASettings

    # Every argument and input before the model loads, every file the model must fit before the calibration.
    with arguments.reported_as("argument --model"):
        config = model_config(args.model)
    check_arguments(args, config)
    inputs = make_inputs(args, config)
    device = args.device or arguments.default_device()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    with arguments.reported_as("argument --model"):
        model = load_model(args.model, device, dtype, args.seed)
    with arguments.reported_as("argument --backend"):
        sagesla.patch(model, topk=1.0, settings=SLASettings(quantized=not args.unquantized, backend=args.backend))
    if args.sla_weights:
        with arguments.reported_as("argument --sla-weights"):
            print(sagesla.load_sla_weights(model, args.sla_weights))
    grid = inputs[0][0].shape[2:]
    tokens = math.prod(size // patch for size, patch in zip(grid, model.config.patch_size, strict=True))
    print(
        f"calibrating {type(model).__name__} ({args.model}) on {device} ({dtype}): {len(inputs)} input(s) x "
        f"{args.steps} steps, latents {tuple(inputs[0][0].shape)} ({tokens} tokens)"
    )
    profile = calibrate(
        model,
        inputs,
        steps=args.steps,
        record_steps=args.record_steps,
        shift=args.shift,
        budget=args.budget,
        metric=args.metric,
        target_sparsity=args.target_sparsity,
        target_psnr=args.target_psnr,
        per_head=args.per_head,
        buckets=args.buckets,
        candidates=args.topk_grid,
    )
    print(summary(profile))
    profile.save(args.out)
    print(f"wrote {args.out}: apply it with sagesla.patch(model, profile={args.out!r})")
    if args.plot:
        plot_profile(profile, args.plot)
        print(f"wrote {args.plot}")
    return 0
