"""Time a calibration of a Wan2.1-T2V-1.3B-shaped diffusers transformer (random weights) against its time budget.

Usage:
    python scripts/calibrate_wan_check.py [--prompts 2 --steps 10] [--frames 21 --height 60 --width 104]
    python scripts/calibrate_wan_check.py --tiny    # CPU smoke run: the 2-block test model, 1024 tokens
    python scripts/calibrate_wan_check.py --target-psnr 30    # to an output PSNR: the judging runs are timed too

The budget: 2 prompts x 10 steps, 30 layers, 32760 tokens, 8 candidate topk in <= 10 minutes on one H100, warm-up
included. The script times, on the same inputs:
  1. warm-up: a 1-step calibration of one prompt (Triton compilation, cuDNN plans); its worst rel-L1 at topk 1.0
     (no block skipped: quantization only) is the correctness check, and the timing stops if it looks wrong;
  2. dense: the denoising run of the unpatched model, nothing measured;
  3. calibrate: the same run under ``sagesla.calibration.calibrate`` (dense attention returned, every candidate
     evaluated per attention call), then the choice (with ``--target-psnr``: the profiles judged by sampling the
     inputs again, included).
Candidate evaluation = 3 - 2. Prints the split, the calls per second, the peak GPU memory and the summary table, and
writes the profile (--out). The random-weight model's attention is diffuse, so most layers need a large topk: the
choice is not the point here, the time is (it does not depend on the choice).
"""

import argparse
import time

import torch

from sagesla.calibration import DEFAULT_CANDIDATES, calibrate, sampling, summary
from sagesla.settings import SLASettings
from sagesla.wan_shapes import WAN_SHAPES, build_wan

# rel-L1 of SageSLA at topk 1.0 against dense attention is quantization error alone: about 0.01 on the tiny CPU
# model, up to about 0.16 on the random-weight 1.3B model, whose near-uniform attention makes outputs means of V,
# small against the rounding of P (benchmarks/experiments.md, Calibration). Above this, the path is broken rather
# than slow.
MAX_QUANTIZATION_ERROR = 0.5


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    """(result, seconds) of ``fn()``, device work included."""
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--height", type=int, default=60)
    parser.add_argument("--width", type=int, default=104)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--target-psnr", type=float, help="calibrate to this output PSNR in dB instead of --budget")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--out", default="wan13b-random.profile.safetensors")
    parser.add_argument("--tiny", action="store_true", help="2-block model on CPU, 4 x 32 x 32 latents")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.tiny:
        shape, device, dtype = WAN_SHAPES["tiny"], "cpu", torch.float32
        args.frames, args.height, args.width = 4, 32, 32
    else:
        shape, device, dtype = WAN_SHAPES["wan2.1-1.3b"], "cuda", torch.bfloat16
    model = build_wan(shape, device, dtype)
    text_shape = (1, shape.text_tokens, shape.config["text_dim"])
    inputs = [
        (torch.randn(1, 16, args.frames, args.height, args.width), torch.randn(*text_shape))
        for _ in range(args.prompts)
    ]
    tokens = args.frames * args.height * args.width // 4
    layers = len(model.blocks)
    calls = args.prompts * args.steps * layers
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {layers} layers, {tokens} tokens, {args.prompts} x {args.steps} steps")
    settings = SLASettings(backend=args.backend)

    warm, warm_s = timed(lambda: calibrate(model, inputs[:1], steps=1, settings=settings, progress=False))
    quantization = float(warm.measurements.rel_l1_max[..., -1].max())
    print(f"warm-up (1 step, compilation): {warm_s:.1f} s; worst rel-L1 at topk 1.0 (quantization) {quantization:.4f}")
    if not quantization <= MAX_QUANTIZATION_ERROR:
        raise SystemExit(
            f"rel-L1 at topk 1.0 {quantization:.4f} > {MAX_QUANTIZATION_ERROR}: no timing after a mismatch"
        )

    _, dense_s = timed(lambda: [sampling.denoise(model, x, text, args.steps) for x, text in inputs])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    goal = {"budget": args.budget} if args.target_psnr is None else {"target_psnr": args.target_psnr}
    profile, total_s = timed(
        lambda: calibrate(model, inputs, steps=args.steps, settings=settings, progress=True, **goal)
    )
    candidates_s = total_s - dense_s
    print(summary(profile))
    profile.save(args.out)
    print(f"wrote {args.out}")
    print(f"\ndense run alone:      {dense_s:8.1f} s ({args.prompts * args.steps} forwards)")
    print(
        f"calibration:          {total_s:8.1f} s  ({calls} attention calls, {len(DEFAULT_CANDIDATES)} candidates "
        f"+ topk 1.0 each, {calls / total_s:.1f} calls/s)"
    )
    judged = "" if args.target_psnr is None else ", the judging runs included"
    print(f"candidate evaluation: {candidates_s:8.1f} s  ({candidates_s / calls * 1e3:.1f} ms per call{judged})")
    if args.target_psnr is not None:
        print(
            f"output PSNR:          {profile.selection.output_psnr:8.2f} dB (asked {args.target_psnr:g}), mean "
            f"sparsity {profile.mean_sparsity():.1%}"
        )
    print(f"dense share:          {dense_s / total_s:8.1%}")
    if device == "cuda":
        print(f"peak GPU memory:      {torch.cuda.max_memory_allocated() / 2**30:8.1f} GiB")
    verdict = "meets" if total_s + warm_s <= 600 else "misses"
    print(f"target <= 600 s with warm-up: {total_s + warm_s:.1f} s, {verdict} it")


if __name__ == "__main__":
    main()
