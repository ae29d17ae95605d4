"""One denoising step of a Wan2.1-T2V-1.3B-shaped diffusers model (random weights): dense, then patched by SLA.

Usage:
    python scripts/patch_wan_check.py [--topk 0.1] [--backend triton] [--frames 21 --height 60 --width 104]
    python scripts/patch_wan_check.py --tiny    # CPU smoke run: the 2-block test model, backend "torch"

Needs diffusers. Prints the patch report, what every layer's last call did (SLA with its sparsity, or the dense
fallback and why), the median ms of the step dense and patched (after one warm-up step), and the patched output's
rel-L1 and cosine against the dense one. proj_l is zero, so only block sparsity and quantization differ. The
default latent (21 x 60 x 104) is 81 frames of 480 x 832 video: 32760 tokens.
"""

import argparse
import statistics
import time

import torch

import sagesla
from sagesla import metrics
from sagesla.testing import sla_processors
from sagesla.wan_shapes import WAN_SHAPES, WanShape, build_wan, wan_step_inputs


def step_ms(model: torch.nn.Module, inputs: tuple, repeats: int) -> tuple[torch.Tensor, float]:
    """(output of the step, median ms over ``repeats`` steps after one warm-up step)."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            out = model(*inputs, return_dict=False)[0]
            if out.is_cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return out, statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topk", type=float, default=0.1)
    parser.add_argument("--backend", default="triton", choices=["auto", "torch", "triton"])
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--height", type=int, default=60)
    parser.add_argument("--width", type=int, default=104)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="2-block model on CPU, backend 'torch', 4 x 16 x 16")
    args = parser.parse_args()
    if args.tiny:
        shape, device, dtype, args.backend = WAN_SHAPES["tiny"], "cpu", torch.float32, "torch"
    else:
        base = WAN_SHAPES["wan2.1-1.3b"]
        shape = WanShape(base.config, (args.frames, args.height, args.width), base.text_tokens)
        device, dtype = "cuda", torch.bfloat16
    model = build_wan(shape, device, dtype)
    inputs = wan_step_inputs(shape, device, dtype)
    tokens = shape.tokens
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch {torch.__version__}, {tokens} tokens")

    dense, dense_ms = step_ms(model, inputs, args.repeats)
    print(sagesla.patch(model, topk=args.topk, backend=args.backend))
    patched, patched_ms = step_ms(model, inputs, args.repeats)
    calls: dict[str, list[str]] = {}
    for processor in sla_processors(model).values():
        outcome = processor.last_fallback or f"SLA, sparsity {processor.last_sparsity:.3f}"
        calls.setdefault(outcome, []).append(processor.layer_name)
    for outcome, layers in calls.items():
        print(f"last call of {len(layers)} layer(s): {outcome}")
    print(f"step: dense {dense_ms:.1f} ms, patched {patched_ms:.1f} ms ({dense_ms / patched_ms:.2f}x)")
    print(f"patched vs dense: rel-L1 {metrics.rel_l1(patched, dense):.4f}, cosine {metrics.cosine(patched, dense):.6f}")


if __name__ == "__main__":
    main()
