"""Do the embedded model's samples show the prompted shape and motion? One sample per prompt, measured on pixels.

Usage:
    python scripts/check_tiny_motion.py [--weights sagesla/embedded/tiny-video.safetensors] [--steps 10] [--every 1]
    python scripts/check_tiny_motion.py --every 16 --min-colour 0.8    # 10 prompts, as the tests check it

For each prompt (every ``--every``-th of ``sagesla.embedded.videos.PROMPTS``), one video sampled from seeded noise
(``sagesla.calibration.sampling.denoise``), then from the pixels of the prompted colour (``videos.track``; the
distracting shapes never take it): the prompted shape's travel in the world (its travel in the picture plus the
camera's pan) along the prompted direction (the training videos travel 30-45 % of the frame), and its area in the
first, middle and last frames (it must not vanish). A prompt passes when its shape travels >= 25 % of the frame the
prompted way and stays in sight. Apart from motion, the colour check: the prompted colour covers more of the video
than any other colour (the prompted shape is the largest; the two distracting shapes are smaller and of other
colours, though both may draw the same one), which the training videos meet 158 times in 160 and random weights
about one time in four. Prints one line per prompt and both counts; exits 1
when fewer than ``--min-pass`` of the prompts pass.
"""

import argparse
import sys

import torch

from sagesla.calibration.sampling import denoise
from sagesla.embedded.model import LATENT_SHAPE, WEIGHTS, load
from sagesla.embedded.videos import CAMERA_SPEED, CAMERAS, COLOURS, DIRECTIONS, PROMPTS, from_latent, parse, track

MIN_TRAVEL = 0.25  # of the frame, along the prompted direction, in the world
MIN_AREA = 8.0  # pixels of the prompted colour in a frame (the shape's radius is 5.8-8.3 pixels)


def check(video: torch.Tensor, prompt: str) -> tuple[bool, bool, str]:
    """(passes the motion check, the prompted colour is the largest, one line) for a video [3, F, S, S] in [-1, 1]."""
    colour, _, direction, camera = parse(prompt)
    size, frames = video.shape[-1], video.shape[1]
    tracks = {name: [x[0] for x in track(video[None], name)] for name in COLOURS}  # [F, 2] centre, [F] area each
    centre, area = tracks[colour]
    largest = max(tracks, key=lambda name: float(tracks[name][1].sum()))
    pan = torch.tensor(CAMERAS[camera]) * CAMERA_SPEED * (frames - 1)
    along = float((centre[-1] - centre[0] + pan) @ torch.tensor(DIRECTIONS[direction]))
    seen = [float(area[t]) for t in (0, frames // 2, -1)]
    in_sight = min(seen) >= MIN_AREA
    passes = in_sight and along >= MIN_TRAVEL * size  # NaN travel (shape gone) compares False
    line = (
        f"{prompt:42s} travel {along:6.1f} px  area {seen[0]:5.1f} {seen[1]:5.1f} {seen[2]:5.1f}  "
        f"{'in sight' if in_sight else 'LOST':8s}  largest {largest:6s}  {'pass' if passes else 'FAIL'}"
    )
    return passes, largest == colour, line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    parser.add_argument("--every", type=int, default=1, help="check every n-th prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-pass", type=float, default=0.0, help="fraction of prompts that must pass")
    parser.add_argument(
        "--min-colour", type=float, default=0.0, help="fraction of prompts whose prompted colour must be the largest"
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, embed = load(args.weights, device)
    prompts = list(PROMPTS[:: args.every])
    noise = torch.randn(len(prompts), *LATENT_SHAPE, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        videos = (
            from_latent(denoise(model, noise, embed(prompts), args.steps, guidance=args.guidance)).clamp(-1, 1).cpu()
        )
    passed = coloured = 0
    for prompt, video in zip(prompts, videos, strict=True):
        moves, colour_ok, line = check(video, prompt)
        passed, coloured = passed + moves, coloured + colour_ok
        print(line)
    setting = f"{args.steps} steps, guidance {args.guidance}, seed {args.seed}"
    print(
        f"{passed}/{len(prompts)} prompts pass; the prompted colour is the largest in {coloured}/{len(prompts)} "
        f"({args.weights}, {setting})"
    )
    enough = passed >= args.min_pass * len(prompts) and coloured >= args.min_colour * len(prompts)
    return 0 if enough else 1


if __name__ == "__main__":
    sys.exit(main())
