"""``sagesla calibrate``: calibrate a Wan transformer from the command line and write its profile.

Models: ``--model tiny`` (the 2-block test model with random weights: a smoke run in seconds on CPU) or a local
diffusers folder (a transformer folder with ``config.json``, or a pipeline folder with ``transformer/``).
Inputs: ``--inputs FILE.safetensors`` holding ``text`` [N, T, text_dim] (prompt embeddings from the model's text
encoder) and optionally ``latents`` [N, C, F, H, W] (starting noise; drawn from ``--seed`` when absent), or by
default ``--prompts`` random inputs (noise and text embeddings from seeds ``--seed``, ``--seed + 1``, ...).
"""

import argparse
import json
import math
from pathlib import Path

import torch

from sagesla import validation
from sagesla.calibration.record import DEFAULT_CANDIDATES
from sagesla.calibration.sampling import DEFAULT_SHIFT
from sagesla.profile import METRICS

# (latent frames, height, width) and text tokens: the tiny model's smoke size (1024 tokens, 16 key blocks) and
# Wan2.1 at 480p, 81 frames (32760 tokens) with Wan's 512 text tokens.
TINY_SHAPE, TINY_TEXT = (4, 32, 32), 8
WAN_SHAPE, WAN_TEXT = (21, 60, 104), 512
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``calibrate`` on the ``sagesla`` command's subparsers."""
    parser = subparsers.add_parser(
        "calibrate",
        help="choose per-layer topk within an error budget and write a profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="'tiny' or a local diffusers folder")
    parser.add_argument("--sla-weights", help="SLA-finetuned proj_l to load (any source load_sla_weights reads)")
    parser.add_argument("--inputs", help="safetensors file with `text` [N, T, text_dim] and optional `latents`")
    parser.add_argument("--prompts", type=int, default=2, help="random inputs when --inputs is not given")
    parser.add_argument("--latent-shape", type=int, nargs=3, metavar=("F", "H", "W"), help="latent frames x h x w")
    parser.add_argument("--text-len", type=int, help="tokens of the random text embeddings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per input")
    parser.add_argument("--record-steps", type=int, nargs="+", help="indices of the steps measured (default all)")
    parser.add_argument("--shift", type=float, default=DEFAULT_SHIFT, help="flow shift (Wan: 3 at 480p, 5 at 720p)")
    parser.add_argument("--budget", type=float, default=0.05, help="bound on the worst error of every call")
    parser.add_argument("--target-sparsity", type=float, help="instead of --budget: mean sparsity to reach")
    parser.add_argument("--metric", choices=METRICS, default="rel_l1", help="rel_l1, or cosine (1 - cosine)")
    parser.add_argument("--topk-grid", type=float, nargs="+", default=list(DEFAULT_CANDIDATES), help="candidates")
    parser.add_argument("--per-head", action="store_true", help="the budget holds in every head")
    parser.add_argument("--buckets", type=int, default=1, help="timestep buckets with their own topk")
    parser.add_argument("--backend", choices=validation.BACKENDS, default="auto")
    parser.add_argument("--unquantized", action="store_true", help="calibrate SLA without INT8/FP8 quantization")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--out", default="profile.safetensors", help="the profile file to write")
    parser.add_argument("--plot", help="also write a PNG of topk, sparsity and error per layer")
    parser.set_defaults(run=run)


def load_model(source: str, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """The tiny test model (random weights from ``seed``) or a diffusers model from a local folder, in eval mode."""
    if source == "tiny":
        from sagesla.testing import tiny_wan_transformer

        torch.manual_seed(seed)
        model = tiny_wan_transformer().to(device)
        # diffusers warns on any dtype cast of a Wan model; the tiny one is built in float32.
        return model if dtype == torch.float32 else model.to(dtype)
    import diffusers

    folder = Path(source)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--model {source!r}: no config.json there or in transformer/ (want 'tiny' or a folder)")
    cls = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
    return cls.from_pretrained(folder, torch_dtype=dtype).to(device).eval()


def make_inputs(args: argparse.Namespace, model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(latents [1, C, F, H, W], text [1, T, text_dim]) per prompt, from ``--inputs`` or seeded noise."""
    config, tiny = model.config, args.model == "tiny"
    shape = tuple(args.latent_shape or (TINY_SHAPE if tiny else WAN_SHAPE))
    latent_shape = (1, config.in_channels, *shape)
    if args.inputs:
        from safetensors.torch import load_file

        stored = load_file(args.inputs)
        if "text" not in stored:
            raise SystemExit(f"--inputs {args.inputs!r} has no `text` tensor [N, T, text_dim]")
        texts = list(stored["text"].split(1))
        latents = list(stored["latents"].split(1)) if "latents" in stored else [None] * len(texts)
        if len(latents) != len(texts):
            raise SystemExit(f"--inputs: {len(latents)} latents for {len(texts)} texts")
    else:
        text_shape = (1, args.text_len or (TINY_TEXT if tiny else WAN_TEXT), config.text_dim)
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

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = load_model(args.model, device, dtype, args.seed)
    sagesla.patch(model, topk=1.0, quantized=not args.unquantized, backend=args.backend)
    if args.sla_weights:
        print(sagesla.load_sla_weights(model, args.sla_weights))
    inputs = make_inputs(args, model)
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
