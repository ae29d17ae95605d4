"""Procedural training videos: one coloured shape moving across a dark frame, described by a four-word prompt.

Prompts are ``"<colour> <shape> moves <direction>"`` over ``VOCABULARY``; a video is [3, F, S, S] in [-1, 1]. The
model works in a trivial latent space: pixels folded 2 x 2 into channels ([12, F, S/2, S/2]), exactly invertible.
"""

import itertools

import torch
import torch.nn.functional as F

COLOURS = {"red": (1.0, -0.6, -0.6), "green": (-0.6, 1.0, -0.6), "blue": (-0.6, -0.6, 1.0), "yellow": (1.0, 1.0, -0.6)}
SHAPES = ("circle", "square")
DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
VOCABULARY = (*COLOURS, *SHAPES, "moves", *DIRECTIONS)
PROMPTS = tuple(f"{c} {s} moves {d}" for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS))
BACKGROUND = -0.8


def tokenize(prompts: list[str]) -> torch.Tensor:
    """Prompts -> word ids [N, 4] into ``VOCABULARY``; raises ValueError naming an unknown prompt."""
    ids = []
    for prompt in prompts:
        if prompt not in PROMPTS:
            raise ValueError(f"`prompt` must be '<colour> <shape> moves <direction>' over {VOCABULARY}, got {prompt!r}")
        ids.append([VOCABULARY.index(word) for word in prompt.split()])
    return torch.tensor(ids)


def render(
    prompts: list[str],
    frames: int = 16,
    size: int = 32,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Videos of ``prompts`` [N, 3, frames, size, size] fp32 in [-1, 1] on ``device``: random start, radius and speed
    per video, drawn from ``generator`` (on ``device``, or torch's default generator when None).

    The shape starts on the side it moves away from and crosses about half the frame over the clip.
    """
    n = len(prompts)
    tokenize(prompts)  # validates
    rand = torch.rand(n, 4, generator=generator, device=device)
    radius = size * (0.12 + 0.06 * rand[:, 0])
    speed = size * (0.35 + 0.25 * rand[:, 1]) / max(frames - 1, 1)
    direction = torch.tensor([DIRECTIONS[p.split()[3]] for p in prompts], device=device)
    across = size * (0.3 + 0.4 * rand[:, 2])  # position on the axis the shape does not move along
    start = size / 2 - direction * (size * 0.25) + (1 - direction.abs()) * (across[:, None] - size / 2)
    t = torch.arange(frames, dtype=torch.float32, device=device)
    centre = start[:, None, :] + direction[:, None, :] * speed[:, None, None] * t[None, :, None]  # [N, F, 2]
    grid = torch.arange(size, dtype=torch.float32, device=device) + 0.5
    dy = grid[None, None, :, None] - centre[..., 0, None, None]
    dx = grid[None, None, None, :] - centre[..., 1, None, None]
    square = torch.tensor([p.split()[1] == "square" for p in prompts], device=device)[:, None, None, None]
    distance = torch.where(square, torch.maximum(dy.abs(), dx.abs()), torch.sqrt(dy**2 + dx**2))
    inside = (radius[:, None, None, None] - distance + 0.5).clamp(0, 1)  # one pixel of anti-aliasing: [N, F, S, S]
    colour = torch.tensor([COLOURS[p.split()[0]] for p in prompts], device=device)[:, :, None, None, None]
    return BACKGROUND + inside[:, None] * (colour - BACKGROUND)


def to_latent(video: torch.Tensor) -> torch.Tensor:
    """[N, 3, F, S, S] -> [N, 12, F, S/2, S/2]: each 2 x 2 pixel patch folded into channels."""
    n, c, f, h, w = video.shape
    folded = F.pixel_unshuffle(video.transpose(1, 2).reshape(n * f, c, h, w), 2)
    return folded.reshape(n, f, c * 4, h // 2, w // 2).transpose(1, 2)


def from_latent(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_latent``: [N, 12, F, S/2, S/2] -> [N, 3, F, S, S]."""
    n, c, f, h, w = latent.shape
    unfolded = F.pixel_shuffle(latent.transpose(1, 2).reshape(n * f, c, h, w), 2)
    return unfolded.reshape(n, f, c // 4, h * 2, w * 2).transpose(1, 2)


def centroid(video: torch.Tensor) -> torch.Tensor:
    """Centre of the bright pixels of each frame: [N, 3, F, S, S] -> [N, F, 2] (row, column)."""
    weight = (video.mean(dim=1) - BACKGROUND).clamp(min=0)  # [N, F, S, S]
    grid = torch.arange(video.shape[-1], dtype=torch.float32) + 0.5
    total = weight.sum(dim=(-1, -2)).clamp(min=1e-6)
    rows = (weight.sum(dim=-1) * grid).sum(dim=-1) / total
    cols = (weight.sum(dim=-2) * grid).sum(dim=-1) / total
    return torch.stack((rows, cols), dim=-1)
