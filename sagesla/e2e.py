"""End-to-end denoising-step latency of Wan-shaped transformers: dense SDPA against SageSLA, eager and compiled.

Usage (``sagesla bench-e2e`` or ``python scripts/bench_e2e.py``, same arguments):
    sagesla bench-e2e [--model wan2.1-1.3b] [--compile] [--weights DIR] [--profile FILE] [--out-dir DIR]
    sagesla bench-e2e --model wan2.1-14b --nproc 1 2 4 [--dense]   # Ulysses sequence parallel scaling
    sagesla bench-e2e --model tiny    # CPU smoke run (torch reference backend)
    sagesla bench-e2e --video [--model wan2.1-1.3b] [--compile]   # whole videos: sagesla/e2e_video.py

A step is what a sampler with classifier-free guidance runs per timestep: the transformer on the conditional and on
the unconditional text, one after the other, with ``torch.cuda.synchronize()`` around each step; the median of
``--steps`` steps after ``--warmup``. Random weights (or a local diffusers transformer folder with ``--weights``)
and random latents / text embeddings: text encoding and the VAE are out of scope. The attention share is an
estimate: the attention op alone, timed at the step's shapes, times the calls per step, over the step time.
Writes ``<out-dir>/<gpu>-e2e-<model>.{json,md}``.

``--nproc 1 2 4`` times SageSLA steps (and dense ones with ``--dense``) on 1, 2 and 4 GPUs under Ulysses sequence
parallelism (``sagesla.parallel.enable_ulysses``): the script spawns one process per GPU itself (NCCL; no torchrun
needed), every rank builds the same model from the same seed, and rank 0's step time is reported with the speed-up
over the smallest N of the same run. Writes ``<out-dir>/<gpu>-e2e-<model>-ulysses.{json,md}``.
"""

import argparse
import contextlib
import pathlib
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sagesla
from sagesla import cli as arguments
from sagesla import ops
from sagesla.launch import spawn_ranks
from sagesla.settings import SLASettings
from sagesla.tables import gpu_tag, markdown_table, run_header, write_report
from sagesla.wan_shapes import WAN_SHAPES, build_wan, wan_step_inputs


@dataclass(frozen=True)
class Config:
    label: str
    topk: float | None = None  # None: dense (unless profile)
    profile: str | None = None  # a calibration profile file: per-layer (and per-bucket) topk
    attention: SLASettings = SLASettings()  # the SLA settings (the backend is the run's)
    cudnn: bool = False
    compiled: bool = False


@dataclass(frozen=True)
class Result:
    config: str
    step_ms: float
    speedup: float
    attention_share: float | None
    peak_gib: float | None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(call, repeats: int, warmup: int, device: str) -> float:
    """Median ms of ``call()`` over ``repeats`` runs after ``warmup``, without autograd, synchronized on CUDA."""
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_steps(model, forwards: list[tuple], steps: int, warmup: int, device: str) -> float:
    """Median ms of a step: one forward per entry of ``forwards`` (a guided step: conditional, unconditional)."""

    def step() -> None:
        for inputs in forwards:
            model(*inputs, return_dict=False)

    return median_ms(step, steps, warmup, device)


def attention_ms(shape, config: Config, device: str, dtype: torch.dtype, backend: str) -> float:
    """ms of one self-attention call at the model's shapes (B1, L tokens, H heads, D), as the processor makes it;
    for a profile, the mean over its layers' (and buckets') topk."""
    heads, head_dim = shape.config["num_attention_heads"], shape.config["attention_head_dim"]
    q, k, v = (torch.randn(1, shape.tokens, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    settings = config.attention.replace(tensor_layout="NHD", backend=backend)
    if config.topk is None and config.profile is None:
        calls = [lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))]
    else:
        calls = [lambda topk=topk: ops.attend(q, k, v, topk, settings) for topk in _topks(config)]
    with _dense_backend(config):
        for call in calls:
            call()
        _sync(device)
        start = time.perf_counter()
        for call in calls:
            for _ in range(5):
                call()
        _sync(device)
    return (time.perf_counter() - start) / (5 * len(calls)) * 1e3


def _dense_backend(config: Config):
    return sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if config.cudnn else contextlib.nullcontext()


def _topks(config: Config) -> list[float]:
    """The config's topk; for a profile, one per layer and timestep bucket."""
    if config.profile is None:
        return [config.topk]
    from sagesla.profile import load_profile

    return load_profile(config.profile).topk.flatten().tolist()


DENSE = Config("dense SDPA (default backend)")
SAGESLA = Config("SageSLA topk 0.05", topk=0.05)


def configs(compile_: bool, cuda: bool, profile: str | None) -> list[Config]:
    eager = [
        DENSE,
        *([Config("dense SDPA (cuDNN)", cudnn=True)] if cuda else []),
        SAGESLA,
        Config("SageSLA topk 0.1", topk=0.1),
        *([Config(f"SageSLA profile {pathlib.Path(profile).name}", profile=profile)] if profile else []),
        Config("SLA unquantized topk 0.05", topk=0.05, attention=SLASettings(quantized=False)),
    ]
    # One compiled row (compiling the whole model takes minutes): eager vs compiled at the same settings.
    return eager + [Config("SageSLA topk 0.05, compiled", topk=0.05, compiled=True)] if compile_ else eager


def guided_inputs(shape, device: str, dtype: torch.dtype) -> tuple[tuple, tuple]:
    """(conditional, unconditional) forward inputs of one guided step: the same latent and timestep, two texts."""
    cond = wan_step_inputs(shape, device, dtype, seed=0)
    return cond, (cond[0], cond[1], wan_step_inputs(shape, device, dtype, seed=1)[2])


def reset_memory(cuda: bool) -> None:
    """On CUDA, free the cached blocks and restart the peak-memory count."""
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def prepare(model, config: Config, backend: str, cuda: bool) -> None:
    """Patch ``model`` for ``config`` (unpatched for dense) and, on CUDA, restart the peak-memory count."""
    sagesla.unpatch(model)
    if config.topk is not None or config.profile is not None:
        settings = config.attention.replace(backend=backend)
        sagesla.patch(model, topk=config.topk, profile=config.profile, settings=settings)
    reset_memory(cuda)


def run_config(model, config: Config, inputs, args, device, dtype, backend) -> tuple[float, float | None, float]:
    """(step ms, peak GiB or None, ms of one attention call) of ``config``; leaves the model unpatched."""
    prepare(model, config, backend, device == "cuda")
    runner = model
    if config.compiled:
        torch._dynamo.reset()
        runner = torch.compile(model, fullgraph=True)
    with _dense_backend(config):
        ms = time_steps(runner, list(inputs), args.steps, args.warmup, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    attn = attention_ms(WAN_SHAPES[args.model], config, device, dtype, backend)
    sagesla.unpatch(model)
    return ms, peak, attn


def report(results: list[Result], header: dict, out_dir: str, gpu: str, model: str) -> str:
    """Write ``<out_dir>/<gpu>-e2e-<model>.{json,md}`` (after every configuration: a cut-off run keeps its rows)."""
    table = markdown_table(
        ["config", "step ms", "speed-up vs dense default", "attention share (est.)", "peak GiB"],
        [
            [
                r.config,
                f"{r.step_ms:.1f}",
                f"{r.speedup:.2f}x",
                f"{r.attention_share:.0%}",
                "-" if r.peak_gib is None else f"{r.peak_gib:.1f}",
            ]
            for r in results
        ],
    )
    write_report(_stem(out_dir, gpu, model), header, {"results": [asdict(r) for r in results]}, table)
    return table


def _stem(out_dir: str, gpu: str, model: str, suffix: str = "") -> pathlib.Path:
    return pathlib.Path(out_dir) / f"{gpu_tag(gpu)}-e2e-{model}{suffix}"


@dataclass(frozen=True)
class ScalingResult:
    config: str
    gpus: int
    step_ms: float
    speedup: float  # over the smallest GPU count of the run, same config
    efficiency: float  # speedup / (gpus / smallest count)
    peak_gib: float | None  # the largest of the ranks' (None on CPU)


def time_on_ranks(model_name: str, timed: list[Config], steps: int, warmup: int) -> list[tuple]:
    """On every rank of the group: (label, step ms, peak GiB over ranks or None) per eager config.

    Rank r runs on GPU r in bf16 with the Triton kernels; without GPUs (a smoke run) on the CPU in fp32 with the
    torch reference.
    """
    import torch.distributed as dist

    from sagesla.parallel import enable_ulysses

    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()
    shape = WAN_SHAPES[model_name]
    device, dtype, backend = (f"cuda:{rank}", torch.bfloat16, "triton") if cuda else ("cpu", torch.float32, "torch")
    torch.manual_seed(0)
    model = build_wan(shape, device, dtype)
    cond, uncond = guided_inputs(shape, device, dtype)
    if world > 1:
        enable_ulysses(model)
    rows = []
    for config in timed:
        prepare(model, config, backend, cuda)
        dist.barrier()
        ms = time_steps(model, [cond, uncond], steps, warmup, "cuda" if cuda else "cpu")
        peak = None
        if cuda:
            peak_tensor = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device=device)
            dist.all_reduce(peak_tensor, op=dist.ReduceOp.MAX)
            peak = float(peak_tensor)
        rows.append((config.label, ms, peak))
    return rows


def run_scaling(args, gpu: str, backend: str) -> str:
    """Time ``args.nproc`` GPU counts one after the other; returns the table (written after every count)."""
    timed = [SAGESLA] + ([DENSE] if args.dense else [])
    header = run_header(
        gpu,
        model=args.model,
        tokens=WAN_SHAPES[args.model].tokens,
        weights="random",
        step="2 forwards (classifier-free guidance), batch 1",
        parallelism=f"Ulysses sequence parallel (diffusers context parallelism), {backend}, one process per device",
    )
    print(" | ".join(f"{k}: {v}" for k, v in header.items()), flush=True)
    counts, results, base = sorted(args.nproc), [], {}
    for n in counts:
        for label, ms, peak in spawn_ranks(
            time_on_ranks, n, args.model, timed, args.steps, args.warmup, backend=backend
        ):
            base.setdefault(label, ms)
            speedup = base[label] / ms
            results.append(ScalingResult(label, n, ms, speedup, speedup * counts[0] / n, peak))
            print(f"{label} on {n} GPU(s): {ms:.1f} ms", flush=True)
        table = markdown_table(
            ["config", "GPUs", "step ms", f"speed-up vs {counts[0]} GPU(s)", "efficiency", "peak GiB per GPU"],
            [
                [
                    r.config,
                    r.gpus,
                    f"{r.step_ms:.1f}",
                    f"{r.speedup:.2f}x",
                    f"{r.efficiency:.0%}",
                    "-" if r.peak_gib is None else f"{r.peak_gib:.1f}",
                ]
                for r in sorted(results, key=lambda r: (r.config, r.gpus))
            ],
        )
        payload = {"results": [asdict(r) for r in results]}
        write_report(_stem(args.out_dir, gpu, args.model, "-ulysses"), header, payload, table)
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``sagesla bench-e2e`` and ``scripts/bench_e2e.py``)."""
    parser.add_argument("--model", default="wan2.1-1.3b", choices=sorted(WAN_SHAPES))
    parser.add_argument(
        "--weights",
        type=arguments.diffusers_folder,
        help="local diffusers WanTransformer3DModel folder of --model's shape (default: random weights)",
    )
    parser.add_argument("--steps", type=arguments.positive_int, default=3)
    parser.add_argument("--warmup", type=arguments.non_negative_int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(fullgraph=True) steps")
    parser.add_argument("--out-dir", type=arguments.output_folder, default="benchmarks/results")
    parser.add_argument(
        "--profile",
        type=arguments.input_file,
        help="also time SageSLA at this calibration profile (sagesla calibrate)",
    )
    parser.add_argument(
        "--nproc", type=arguments.positive_int, nargs="+", help="GPU counts to time under Ulysses (e.g. 1 2 4)"
    )
    parser.add_argument("--dense", action="store_true", help="with --nproc: also time dense SDPA steps")
    parser.add_argument(
        "--video",
        action="store_true",
        help="whole-video latency: text encoder, transformer steps and VAE decode, dense 50 guided steps against "
        "SageSLA with 4 rCM steps (sagesla/e2e_video.py)",
    )
    parser.add_argument(
        "--vae-repeats", type=arguments.positive_int, default=2, help="with --video: timed VAE decodes per option"
    )


# The config entries a --weights folder must share with --model: they size the inputs, the attention calls and the
# step.
MATCHED = ("in_channels", "text_dim", "patch_size", "num_attention_heads", "attention_head_dim", "num_layers")


def check_arguments(args: argparse.Namespace) -> None:
    """The checks that need several arguments, the machine or a file's contents; before anything is built.

    Raises:
        sagesla.cli.UsageError: naming the argument.
    """
    cuda = torch.cuda.is_available()
    if args.model != "tiny" and not cuda:
        raise arguments.UsageError(
            f"argument --model: {args.model!r} needs CUDA, which is not available here (--model tiny runs on the CPU)"
        )
    if args.nproc:
        # Without GPUs (a smoke run of --model tiny): gloo processes on the CPU.
        available = torch.cuda.device_count() if cuda else 2
        if max(args.nproc) > available:
            raise arguments.UsageError(
                f"argument --nproc: {args.nproc}: each count must be in [1, {available}] (the GPUs present)"
            )
        _refuse_with(args, "--nproc", "the scaling run times random weights eagerly", compile="--compile")
    elif args.dense:
        raise arguments.UsageError("argument --dense: only with --nproc (the single-GPU run always times dense)")
    if args.video:
        _refuse_with(args, "--video", "the video run times random weights on one device", nproc="--nproc")
    if args.weights:
        import json

        config = json.loads((pathlib.Path(args.weights) / "config.json").read_text())
        wanted = WAN_SHAPES[args.model].config
        wrong = [
            f"{key} {config[key]} (want {wanted[key]})"
            for key in MATCHED
            if key in config and key in wanted and _plain(config[key]) != _plain(wanted[key])
        ]
        if wrong:
            raise arguments.UsageError(
                f"argument --weights: {args.weights!r} is not a {args.model} transformer: {', '.join(wrong)}"
            )
    if args.profile:
        from sagesla.profile import load_profile

        with arguments.reported_as("argument --profile"):
            load_profile(args.profile)


def _refuse_with(args: argparse.Namespace, option: str, why: str, **also: str) -> None:
    """Raise naming ``option`` if ``--weights``, ``--profile`` or an ``also`` argument ({attribute: flag}) is given."""
    flags = {"weights": "--weights", "profile": "--profile", **also}
    unused = [flag for attribute, flag in flags.items() if getattr(args, attribute)]
    if unused:
        raise arguments.UsageError(f"argument {option}: {why}; {', '.join(unused)} is not used with it")


def _plain(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value


def run(args: argparse.Namespace) -> int:
    """Time, print the table and write the result files; returns the exit status."""
    check_arguments(args)
    if args.video:
        from sagesla import e2e_video

        return e2e_video.run(args)
    if args.nproc:
        cuda = torch.cuda.is_available()
        gpu, backend = (torch.cuda.get_device_name(), "nccl") if cuda else ("CPU", "gloo")
        print(run_scaling(args, gpu, backend))
        return 0
    shape = WAN_SHAPES[args.model]
    cuda = torch.cuda.is_available() and args.model != "tiny"
    device, dtype, backend = ("cuda", torch.bfloat16, "triton") if cuda else ("cpu", torch.float32, "torch")
    if args.weights:
        from diffusers import WanTransformer3DModel

        with arguments.reported_as("argument --weights"):
            model = WanTransformer3DModel.from_pretrained(args.weights, torch_dtype=dtype).to(device).eval()
    else:
        model = build_wan(shape, device, dtype)
    if args.profile:
        # The profile must fit the model before any timing: patched once, then unpatched.
        with arguments.reported_as("argument --profile"):
            prepare(model, Config("profile", profile=args.profile), backend, False)
        sagesla.unpatch(model)
    cond, uncond = guided_inputs(shape, device, dtype)
    gpu = torch.cuda.get_device_name() if cuda else "CPU"
    header = run_header(
        gpu,
        model=args.model,
        tokens=shape.tokens,
        weights=args.weights or "random",
        step="2 forwards (classifier-free guidance), batch 1, " + str(dtype).removeprefix("torch."),
    )
    print(" | ".join(f"{k}: {v}" for k, v in header.items()), flush=True)
    calls_per_step = 2 * shape.config["num_layers"]
    results: list[Result] = []
    baseline = None
    for config in configs(args.compile, cuda, args.profile):
        ms, peak, attn = run_config(model, config, (cond, uncond), args, device, dtype, backend)
        baseline = baseline or ms
        share = min(1.0, calls_per_step * attn / ms)
        results.append(Result(config.label, ms, baseline / ms, share, peak))
        print(f"{config.label}: {ms:.1f} ms", flush=True)
        table = report(results, header, args.out_dir, gpu, args.model)
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = arguments.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.set_defaults(run=run)
    return arguments.run_parsed(parser, parser.parse_args(argv))
