"""Whole-video latency of Wan-shaped models: the dense 50-step guided recipe against SageSLA with 4 rCM steps.

Usage (``sagesla bench-e2e --video``; ``--model``, ``--steps``, ``--warmup``, ``--out-dir`` as for the step benchmark):
    sagesla bench-e2e --video --model wan2.1-1.3b [--compile] [--vae-repeats 2]
    sagesla bench-e2e --video --model tiny         # CPU smoke run (torch reference backend, tiny VAE / encoder)

What a user waits for, per video, from prompt to frames:
- the text encoder: umT5-XXL's encoder (transformers ``UMT5EncoderModel`` at its released size, random weights,
  bf16, 512 tokens), once per prompt: twice for a guided video (prompt and negative prompt), once for rCM;
- the transformer: steps x the median step (``--steps`` timed after ``--warmup``, ``torch.cuda.synchronize()``
  around each). A guided step runs the conditional and the unconditional forward; an rCM step one forward;
- the VAE decode: diffusers' ``AutoencoderKLWan`` (Wan2.1's VAE, random weights) from the model's latent to 81
  frames at 480p (1.3B) or 720p (14B), in float32 as diffusers' Wan examples load it; its options (bf16, tiling,
  a compiled decoder) timed in a table of their own.

Recipes: dense SDPA 50 steps with classifier-free guidance (Wan's usual), and SageSLA topk 0.1 with 4 rCM steps and
no guidance (TurboDiffusion's models), eager and compiled (``--compile``: ``torch.compile(fullgraph=True)`` of each
transformer block, diffusers' regional compilation), with and without the quantized linear layers of
``sagesla.quantize_linear`` (torchao: FP8 on sm89+, INT8 elsewhere). Weights are random: the times, not the videos,
are measured. Writes ``<out-dir>/<gpu>-e2e-video-<model>.{json,md}`` after every row.
"""

import argparse
import contextlib
import pathlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

import sagesla
from sagesla.e2e import Config, guided_inputs, median_ms, prepare, reset_memory, time_steps
from sagesla.quantized_linear import quantize_linear
from sagesla.tables import gpu_tag, markdown_table, run_header, write_report
from sagesla.wan_shapes import WAN_SHAPES, build_wan

# umT5-XXL's encoder as Wan's pipelines load it (google/umt5-xxl: 24 layers, d_model 4096, 64 heads, gated GELU).
UMT5_XXL = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "tie_word_embeddings": False,
}
UMT5_TINY = {**UMT5_XXL, "vocab_size": 256, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}
TEXT_TOKENS = 512  # WanPipeline's max_sequence_length
# diffusers' AutoencoderKLWan defaults are Wan2.1's VAE; the tiny one is diffusers' own test configuration.
VAE_TINY = {"base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}
DENSE_STEPS, RCM_STEPS, RCM_TOPK = 50, 4, 0.1


@dataclass(frozen=True)
class Recipe:
    """How a video is sampled: the transformer's configuration and the steps it runs."""

    label: str
    steps: int
    guided: bool  # classifier-free guidance: 2 forwards a step, the prompt and a negative prompt encoded
    topk: float | None = None  # None: dense SDPA
    quantized: bool = False
    compiled: bool = False


def recipes(compile_: bool) -> list[Recipe]:
    """The rows, in the order they run: quantization cannot be undone, so its rows come last."""
    dense = Recipe(f"dense SDPA, {DENSE_STEPS} steps, CFG", DENSE_STEPS, guided=True)
    sla = Recipe(f"SageSLA topk {RCM_TOPK}, {RCM_STEPS} rCM steps", RCM_STEPS, guided=False, topk=RCM_TOPK)
    quantized = Recipe(sla.label + ", quantized linear", RCM_STEPS, guided=False, topk=RCM_TOPK, quantized=True)
    rows = []
    for recipe in (dense, sla, quantized):
        rows.append(recipe)
        if compile_:
            rows.append(Recipe(**{**asdict(recipe), "label": recipe.label + ", compiled", "compiled": True}))
    return rows


@dataclass(frozen=True)
class VideoRow:
    recipe: str
    steps: int
    forwards_per_step: int
    step_ms: float
    transformer_s: float
    text_encoder_s: float | None
    vae_decode_s: float
    video_s: float
    speedup: float  # dense guided video time over this one
    transformer_speedup: float


@dataclass(frozen=True)
class VaeRow:
    option: str
    decode_s: float
    peak_gib: float | None


def text_encoder_seconds(device: str, tiny: bool, repeats: int) -> float | None:
    """Seconds of one umT5 encoder call on ``TEXT_TOKENS`` tokens (None without transformers installed)."""
    try:
        from transformers import UMT5Config, UMT5EncoderModel
    except ImportError:
        return None
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            encoder = UMT5EncoderModel(UMT5Config(**(UMT5_TINY if tiny else UMT5_XXL))).eval()
    finally:
        torch.set_default_dtype(previous)
    ids = torch.randint(0, encoder.config.vocab_size, (1, TEXT_TOKENS), device=device)
    mask = torch.ones_like(ids)
    return median_ms(lambda: encoder(input_ids=ids, attention_mask=mask), repeats, 1, device) / 1e3


# The VAE options timed: name -> (dtype, the setting around the decodes). The compiled one runs last, after the
# transformer rows, so its compilation can cut off nothing else.
EAGER_VAE = ("float32", "bfloat16", "bfloat16, tiling")
COMPILED_VAE = ("bfloat16, compiled decoder",)


def vae_options(model_name: str, device: str, repeats: int, names: tuple[str, ...]) -> list[VaeRow]:
    """Decode seconds of diffusers' ``AutoencoderKLWan`` from ``model_name``'s latent to frames, per option."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**(VAE_TINY if model_name == "tiny" else {})).to(device).eval()
    frames, height, width = WAN_SHAPES[model_name].latent
    latent = torch.randn(1, vae.config.z_dim, frames, height, width, device=device)
    settings: dict[str, tuple[torch.dtype, Callable[[], contextlib.AbstractContextManager]]] = {
        "float32": (torch.float32, contextlib.nullcontext),
        "bfloat16": (torch.bfloat16, contextlib.nullcontext),
        "bfloat16, tiling": (torch.bfloat16, lambda: _tiling(vae)),
        "bfloat16, compiled decoder": (torch.bfloat16, lambda: _compiled_decoder(vae)),
    }
    rows = []
    for name in names:
        dtype, setting = settings[name]
        vae.to(dtype)
        reset_memory(device == "cuda")
        with setting():
            seconds = median_ms(lambda dtype=dtype: vae.decode(latent.to(dtype)), repeats, 1, device) / 1e3
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        rows.append(VaeRow(name, seconds, peak))
        print(f"VAE decode, {name}: {seconds:.2f} s", flush=True)
    return rows


@contextlib.contextmanager
def _tiling(vae: nn.Module):
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.disable_tiling()


@contextlib.contextmanager
def _compiled_decoder(vae: nn.Module):
    decoder = vae.decoder
    torch._dynamo.reset()
    vae.decoder = torch.compile(decoder)
    try:
        yield
    finally:
        vae.decoder = decoder


@contextlib.contextmanager
def _compiled_blocks(model: nn.Module):
    """Each transformer block under ``torch.compile(fullgraph=True)`` (regional compilation); restored after."""
    blocks = list(model.blocks)
    torch._dynamo.reset()
    for index, block in enumerate(blocks):
        model.blocks[index] = torch.compile(block, fullgraph=True)
    try:
        yield
    finally:
        for index, block in enumerate(blocks):
            model.blocks[index] = block


def step_ms(model: nn.Module, recipe: Recipe, inputs, args, device: str, backend: str) -> float:
    """Median ms of one step of ``recipe`` (the model patched for it, then unpatched)."""
    prepare(model, Config(recipe.label, topk=recipe.topk), backend, device == "cuda")
    cond, uncond = inputs
    forwards = [cond, uncond] if recipe.guided else [cond]
    with _compiled_blocks(model) if recipe.compiled else contextlib.nullcontext():
        ms = time_steps(model, forwards, args.steps, args.warmup, device)
    sagesla.unpatch(model)
    return ms


def video_table(rows: list[VideoRow]) -> str:
    return markdown_table(
        [
            "recipe",
            "steps x forwards",
            "step ms",
            "transformer s",
            "text encoder s",
            "VAE decode s",
            "video s",
            "video speed-up",
            "transformer speed-up",
        ],
        [
            [
                r.recipe,
                f"{r.steps} x {r.forwards_per_step}",
                f"{r.step_ms:.1f}",
                f"{r.transformer_s:.2f}",
                "-" if r.text_encoder_s is None else f"{r.text_encoder_s:.3f}",
                f"{r.vae_decode_s:.2f}",
                f"{r.video_s:.2f}",
                f"{r.speedup:.1f}x",
                f"{r.transformer_speedup:.1f}x",
            ]
            for r in rows
        ],
    )


def vae_table(rows: list[VaeRow]) -> str:
    return markdown_table(
        ["VAE decode option", "s", "peak GiB"],
        [[r.option, f"{r.decode_s:.2f}", "-" if r.peak_gib is None else f"{r.peak_gib:.1f}"] for r in rows],
    )


def run(args: argparse.Namespace) -> int:
    """Time the text encoder, the VAE options and every recipe; print and write the tables."""
    shape = WAN_SHAPES[args.model]
    cuda = torch.cuda.is_available() and args.model != "tiny"
    device, dtype, backend = ("cuda", torch.bfloat16, "triton") if cuda else ("cpu", torch.float32, "torch")
    gpu = torch.cuda.get_device_name() if cuda else "CPU"
    frames, height, width = shape.latent
    header = run_header(
        gpu,
        model=args.model,
        tokens=shape.tokens,
        weights="random",
        video=f"{4 * (frames - 1) + 1} frames of {8 * height} x {8 * width}",
        transformer=f"batch 1, {str(dtype).removeprefix('torch.')}",
    )
    print(" | ".join(f"{k}: {v}" for k, v in header.items()), flush=True)
    stem = pathlib.Path(args.out_dir) / f"{gpu_tag(gpu)}-e2e-video-{args.model}"
    encoder_s = text_encoder_seconds(device, args.model == "tiny", repeats=5)
    print(f"text encoder: {encoder_s if encoder_s is None else round(encoder_s, 4)} s", flush=True)
    reset_memory(device == "cuda")
    vae_rows = vae_options(args.model, device, args.vae_repeats, EAGER_VAE)
    reset_memory(device == "cuda")
    decode_s = vae_rows[0].decode_s
    model = build_wan(shape, device, dtype)
    inputs = guided_inputs(shape, device, dtype)
    rows: list[VideoRow] = []
    quantized = False
    for recipe in recipes(args.compile):
        if recipe.quantized and not quantized:
            print(quantize_linear(model), flush=True)
            quantized = True
        ms = step_ms(model, recipe, inputs, args, device, backend)
        forwards = 2 if recipe.guided else 1
        transformer_s = recipe.steps * ms / 1e3
        encoder = None if encoder_s is None else encoder_s * forwards
        video_s = transformer_s + (encoder or 0.0) + decode_s
        base = rows[0] if rows else None
        rows.append(
            VideoRow(
                recipe.label,
                recipe.steps,
                forwards,
                ms,
                transformer_s,
                encoder,
                decode_s,
                video_s,
                (base.video_s if base else video_s) / video_s,
                (base.transformer_s if base else transformer_s) / transformer_s,
            )
        )
        print(f"{recipe.label}: {ms:.1f} ms a step", flush=True)
        markdown = _write(stem, header, rows, vae_rows)
    if cuda:
        del model
        reset_memory(device == "cuda")
        vae_rows += vae_options(args.model, device, args.vae_repeats, COMPILED_VAE)
        markdown = _write(stem, header, rows, vae_rows)
    print(markdown)
    return 0


def _write(stem: pathlib.Path, header: dict, rows: list[VideoRow], vae_rows: list[VaeRow]) -> str:
    """Write ``stem.{json,md}``; returns the markdown tables."""
    markdown = video_table(rows) + "\n\n" + vae_table(vae_rows)
    write_report(
        stem, header, {"videos": [asdict(r) for r in rows], "vae_decode": [asdict(r) for r in vae_rows]}, markdown
    )
    return markdown
