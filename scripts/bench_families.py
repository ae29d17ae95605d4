"""Per-step time of a patched diffusers video transformer of each family against dense, at the token counts the
released models sample at.

Each model is built at its released width (heads x head_dim, text and conditioning widths) with random weights and
2 transformer blocks (HunyuanVideo: 2 dual-stream + 2 single-stream), bf16 on one GPU; a step is one forward. The
dense row runs diffusers' own attention (its default backend, SDPA); the SageSLA rows run ``sagesla.patch`` at each
topk (Triton kernels, zero ``proj_l``), after checking that every patched layer ran SLA (no dense fallback). Only the
attention differs between rows, so the difference is SLA's; with 2 blocks the projections and MLPs weigh as in the
full model, the embedders and the final layer more.

Usage:
    python scripts/bench_families.py [--family ltx-video ...] [--out-dir benchmarks/results]
    python scripts/bench_families.py --smoke   # CPU, tiny shapes, torch backend: checks the script runs

Timings are medians of ``triton.testing.do_bench`` after warm-up. Writes ``<out-dir>/<gpu>-families.{json,md}``.
"""

import argparse
import dataclasses
import pathlib
import statistics
import time
from collections.abc import Callable

import torch

import sagesla
from sagesla.tables import gpu_tag, markdown_table, run_header, write_report
from sagesla.testing import sla_processors

TOPKS = (0.05, 0.1)


@dataclasses.dataclass(frozen=True)
class Case:
    """One family at one shape: the diffusers class, its config and a builder of one step's inputs."""

    model: str
    shape: str  # what the token count stands for
    tokens: int  # the tokens SLA attends over (video)
    config: dict
    inputs: Callable[[torch.device, torch.dtype], dict]


def _randn(device, dtype, *shape):
    return torch.randn(*shape, device=device, dtype=dtype)


def _mask(device, length: int, valid: int) -> torch.Tensor:
    return (torch.arange(length, device=device) < valid)[None].to(torch.float32)


def _ltx(frames, height, width, smoke=False):
    def inputs(device, dtype):
        return {
            "hidden_states": _randn(device, dtype, 1, frames * height * width, 128),
            "encoder_hidden_states": _randn(device, dtype, 1, 128, 4096),
            "timestep": torch.tensor([500], device=device),
            "encoder_attention_mask": _mask(device, 128, 40),
            "num_frames": frames,
            "height": height,
            "width": width,
        }

    config = {"num_layers": 2} | ({"num_attention_heads": 2, "cross_attention_dim": 128} if smoke else {})
    return config, inputs


def _ltx2(frames, height, width, audio, smoke=False):
    def inputs(device, dtype):
        return {
            "hidden_states": _randn(device, dtype, 1, frames * height * width, 128),
            "audio_hidden_states": _randn(device, dtype, 1, audio, 128),
            "encoder_hidden_states": _randn(device, dtype, 1, 128, 3840),
            "audio_encoder_hidden_states": _randn(device, dtype, 1, 128, 3840),
            "timestep": torch.tensor([500.0], device=device),
            "encoder_attention_mask": _mask(device, 128, 40),
            "audio_encoder_attention_mask": _mask(device, 128, 40),
            "num_frames": frames,
            "height": height,
            "width": width,
            "audio_num_frames": audio,
        }

    config = {"num_layers": 2} | ({"num_attention_heads": 2, "audio_num_attention_heads": 2} if smoke else {})
    return config, inputs


def _hunyuan_video(frames, height, width, smoke=False):
    def inputs(device, dtype):
        return {
            "hidden_states": _randn(device, dtype, 1, 16, frames, height, width),
            "timestep": torch.tensor([500], device=device),
            "encoder_hidden_states": _randn(device, dtype, 1, 256, 4096),
            "encoder_attention_mask": _mask(device, 256, 60),
            "pooled_projections": _randn(device, dtype, 1, 768),
            "guidance": torch.tensor([6000.0], device=device, dtype=dtype),
        }

    config = {"num_layers": 2, "num_single_layers": 2, "num_refiner_layers": 1}
    return config | ({"num_attention_heads": 2, "rope_axes_dim": (16, 24, 24)} if smoke else {}), inputs


def _hunyuan_video15(frames, height, width, smoke=False):
    def inputs(device, dtype):
        return {
            "hidden_states": _randn(device, dtype, 1, 65, frames, height, width),
            "timestep": torch.tensor([500.0], device=device, dtype=dtype),
            "encoder_hidden_states": _randn(device, dtype, 1, 256, 3584),
            "encoder_attention_mask": _mask(device, 256, 60),
            "encoder_hidden_states_2": _randn(device, dtype, 1, 64, 1472),
            "encoder_attention_mask_2": _mask(device, 64, 20),
            "image_embeds": torch.zeros(1, 729, 1152, device=device, dtype=dtype),
        }

    config = {"num_layers": 2, "num_refiner_layers": 1}
    return config | ({"num_attention_heads": 2, "rope_axes_dim": (16, 56, 56)} if smoke else {}), inputs


def _cogvideox(frames, height, width, smoke=False):
    def inputs(device, dtype):
        return {
            "hidden_states": _randn(device, dtype, 1, frames, 16, height, width),
            "encoder_hidden_states": _randn(device, dtype, 1, 226, 4096),
            "timestep": torch.tensor([500], device=device),
        }

    # CogVideoX-5B: 48 heads of 64, sincos positions sized for the shape.
    config = {
        "num_attention_heads": 2 if smoke else 48,
        "num_layers": 2,
        "sample_frames": (frames - 1) * 4 + 1,
        "sample_height": height,
        "sample_width": width,
    }
    return config, inputs


def _mochi(frames, height, width, smoke=False):
    def inputs(device, dtype):
        return {
            "hidden_states": _randn(device, dtype, 1, 12, frames, height, width),
            "encoder_hidden_states": _randn(device, dtype, 1, 256, 4096),
            "timestep": torch.tensor([500], device=device),
            "encoder_attention_mask": _mask(device, 256, 60),
        }

    return {"num_layers": 2} | ({"num_attention_heads": 2} if smoke else {}), inputs


def _case(model, shape, tokens, built) -> Case:
    config, inputs = built
    return Case(model, shape, tokens, config, inputs)


def cases(smoke: bool) -> dict[str, Case]:
    """{family id: case}: the released shapes, or tiny ones with ``smoke``."""
    if smoke:
        return {
            "ltx-video": _case("LTXVideoTransformer3DModel", "smoke", 256, _ltx(4, 8, 8, True)),
            "mochi": _case("MochiTransformer3DModel", "smoke", 256, _mochi(4, 16, 16, True)),
        }
    return {
        # 1216x704, 257 frames (VAE 32x32x8, patch 1)
        "ltx-video": _case("LTXVideoTransformer3DModel", "1216x704, 257 frames", 27588, _ltx(33, 22, 38)),
        "ltx-2": _case("LTX2VideoTransformer3DModel", "1216x704, 257 frames", 27588, _ltx2(33, 22, 38, 256)),
        # 960x544, 129 frames (VAE 8x8x4, patch 2)
        "hunyuan-video": _case(
            "HunyuanVideoTransformer3DModel", "960x544, 129 frames", 67320, _hunyuan_video(33, 68, 120)
        ),
        # 848x480, 121 frames (VAE 16x16x4, patch 1)
        "hunyuan-video-1.5": _case(
            "HunyuanVideo15Transformer3DModel", "848x480, 121 frames", 49290, _hunyuan_video15(31, 30, 53)
        ),
        # 720x480, 49 frames (VAE 8x8x4, patch 2)
        "cogvideox": _case("CogVideoXTransformer3DModel", "720x480, 49 frames", 17550, _cogvideox(13, 60, 90)),
        # 848x480, 163 frames (VAE 8x8x6, patch 2)
        "mochi": _case("MochiTransformer3DModel", "848x480, 163 frames", 44520, _mochi(28, 60, 106)),
    }


def _median_ms(fn, device: torch.device) -> float:
    """Median ms of ``fn``: ``do_bench`` on a GPU, wall-clock repeats on CPU (the smoke run)."""
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=200, rep=1500, return_mode="median")
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _rows(name: str, case: Case, device: torch.device, backend: str) -> list[dict]:
    import diffusers

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = getattr(diffusers, case.model)(**case.config).to(device, dtype).eval()
    inputs = case.inputs(device, dtype)

    def step():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    dense = step().float()
    dense_ms = _median_ms(step, device)
    row = {"family": name, "model": case.model, "shape": case.shape, "tokens": case.tokens}
    rows = [row | {"attention": "dense", "topk": None, "sparsity": 0.0, "ms": dense_ms, "speedup": 1.0, "rel_l1": 0.0}]
    for topk in TOPKS:
        report = sagesla.patch(model, topk=topk, backend=backend)
        out = step().float()
        processors = list(sla_processors(model).values())
        fallbacks = {p.layer_name: p.last_fallback for p in processors if p.last_fallback is not None}
        if not processors or fallbacks:
            raise RuntimeError(f"{name}: SLA did not serve every patched layer ({report}; fallbacks {fallbacks})")
        ms = _median_ms(step, device)
        rows.append(
            row
            | {
                "attention": f"SageSLA ({len(processors)} layers)",
                "topk": topk,
                "sparsity": statistics.mean(p.last_sparsity for p in processors),
                "ms": ms,
                "speedup": dense_ms / ms,
                "rel_l1": float((out - dense).abs().sum() / dense.abs().sum()),
            }
        )
        sagesla.unpatch(model)
    return rows


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--family", nargs="*", help="family ids (default: all)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, torch backend (checks the script runs)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    chosen = cases(args.smoke)
    unknown = sorted(set(args.family or ()) - set(chosen))
    if unknown:
        parser.error(f"--family: unknown {unknown}; choose from {sorted(chosen)}")
    header = run_header(torch.cuda.get_device_name() if device.type == "cuda" else "CPU", blocks=2, dtype="bf16")
    rows = []
    for name in args.family or chosen:
        rows += _rows(name, chosen[name], device, "torch" if args.smoke else "triton")
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the model of the family just timed is gone
        print(*(f"{row['family']} {row['attention']} topk {row['topk']}: {row['ms']:.1f} ms" for row in rows[-3:]))
    columns = ["family", "model", "shape", "tokens", "attention", "topk", "sparsity", "ms", "speedup", "rel_l1"]
    table = markdown_table(columns, [[_cell(row[column]) for column in columns] for row in rows])
    print(table)
    write_report(pathlib.Path(args.out_dir) / f"{gpu_tag(header['gpu'])}-families", header, {"rows": rows}, table)


if __name__ == "__main__":
    main()
