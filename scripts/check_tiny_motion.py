"""Do the embedded model's samples show the prompted motion? One sample per prompt, measured on the pixels.

Usage:
    python scripts/check_tiny_motion.py [--weights sagesla/embedded/tiny-video.safetensors] [--steps 10] [--every 1]

For each prompt (every ``--every``-th of ``sagesla.embedded.videos.PROMPTS``), one video sampled from seeded noise
(``sagesla.calibration.sampling.denoise``), then from its bright pixels: the centroid's travel along the prompted
direction (the training videos cross at least 30 % of the frame) and sideways, the lit fraction of the first,
middle and last frames (the shape must not vanish), and the mean colour against the prompted one. A prompt passes
when it travels >= 30 % of the frame the right way, stays lit, and has the right dominant colour channel. Prints
one line per prompt and the pass count; exits 1 when fewer than ``--min-pass`` of the prompts pass.
"""

import argparse
import sys

import torch

from sagesla.calibration.sampling import denoise
from sagesla.embedded.model import LATENT_SHAPE, WEIGHTS, load
from sagesla.embedded.videos import BACKGROUND, COLOURS, DIRECTIONS, PROMPTS, centroid, from_latent

MIN_TRAVEL = 0.3  # of the frame, along the prompted direction
MIN_LIT = 0.01  # fraction of the frame's pixels brighter than the background


def check(video: torch.Tensor, prompt: str) -> tuple[bool, str]:
    """(passes, one line) for a sampled video [3, F, S, S] in [-1, 1]."""
    colour, _, _, direction = prompt.split()
    size = video.shape[-1]
    path = centroid(video[None])[0]  # [F, 2]
    travel = path[-1] - path[0]
    along = float(travel @ torch.tensor(DIRECTIONS[direction]))
    lit = video.mean(dim=0) > BACKGROUND + 0.3  # [F, S, S]
    frames = [float(lit[t].float().mean()) for t in (0, video.shape[1] // 2, -1)]
    mean_colour = video[:, lit].mean(dim=1) if bool(lit.any()) else torch.full((3,), BACKGROUND)
    right_colour = all((float(m) > 0) == (c > 0) for m, c in zip(mean_colour, COLOURS[colour], strict=True))
    passes = along >= MIN_TRAVEL * size and min(frames) >= MIN_LIT and right_colour
    line = (
        f"{prompt:28s} travel {along:6.1f} px  lit {frames[0]:.3f} {frames[1]:.3f} {frames[2]:.3f}  "
        f"colour {'ok' if right_colour else 'WRONG'}  {'pass' if passes else 'FAIL'}"
    )
    return passes, line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    parser.add_argument("--every", type=int, default=1, help="check every n-th prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-pass", type=float, default=0.0, help="fraction of prompts that must pass")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, embed = load(args.weights, device)
    prompts = list(PROMPTS[:: args.every])
    noise = torch.randn(len(prompts), *LATENT_SHAPE, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        videos = (
            from_latent(denoise(model, noise, embed(prompts), args.steps, guidance=args.guidance)).clamp(-1, 1).cpu()
        )
    passed = 0
    for prompt, video in zip(prompts, videos, strict=True):
        ok, line = check(video, prompt)
        passed += ok
        print(line)
    setting = f"{args.steps} steps, guidance {args.guidance}, seed {args.seed}"
    print(f"{passed}/{len(prompts)} prompts pass ({args.weights}, {setting})")
    return 0 if passed >= args.min_pass * len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
