"""Procedural training videos: a prompted shape and two others moving over a textured world a camera pans across.

A prompt is ``"<colour> <shape> moves <direction>, camera <camera>"``, e.g. "red circle moves right, camera pans
left"; a video is [3, F, S, S] in [-1, 1] (``FRAMES`` = 32 frames of ``SIZE`` = 64 pixels). Each video holds:
- a world: a smooth grey texture, larger than the frame, that the camera pans across at ``CAMERA_SPEED`` pixels a
  frame (or holds still), so most of the picture moves the same way from frame to frame, as in real footage;
- the prompted shape, drawn last (on top), moving the prompted way in the world at a random speed;
- two smaller distracting shapes of the other colours, each moving its own random way.
Attention is then local as in real video: a pixel is best predicted from the same place in nearby frames.

The model works in a trivial latent space: 2 x 2 pixels folded into channels ([12, F, S/2, S/2]), exactly
invertible.
"""

import itertools
import re

import torch
import torch.nn.functional as F

COLOURS = {"red": (1.0, -0.6, -0.6), "green": (-0.6, 1.0, -0.6), "blue": (-0.6, -0.6, 1.0), "yellow": (1.0, 1.0, -0.6)}
SHAPES = ("circle", "square")
DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
# Where the camera turns: the picture moves the other way.
CAMERAS = {"still": (0.0, 0.0), **{f"pans {name}": step for name, step in DIRECTIONS.items()}}
# One token per prompt field: colour, shape, direction, camera.
VOCABULARY = (*COLOURS, *SHAPES, *DIRECTIONS, *(f"camera {name}" for name in CAMERAS))
PROMPTS = tuple(
    f"{c} {s} moves {d}, camera {m}" for c, s, d, m in itertools.product(COLOURS, SHAPES, DIRECTIONS, CAMERAS)
)
_GRAMMAR = re.compile(r"(\w+) (\w+) moves (\w+), (camera (?:still|pans \w+))")
FRAMES, SIZE = 32, 64
CAMERA_SPEED = 1  # pixels a frame
BACKGROUND = -0.6  # the texture's mean level
TEXTURE = 0.25  # the texture's amplitude around it
DISTRACTORS = 2
FOLD = (1, 2, 2)  # frames, rows, columns folded into the latent's channels


def tokenize(prompts: list[str]) -> torch.Tensor:
    """Prompts -> ids [N, 4] into ``VOCABULARY`` (colour, shape, direction, camera); raises ValueError naming an
    unknown prompt."""
    ids = []
    for prompt in prompts:
        match = _GRAMMAR.fullmatch(prompt) if prompt in PROMPTS else None
        if match is None:
            raise ValueError(
                "`prompt` must be '<colour> <shape> moves <direction>, camera <still | pans direction>' with "
                f"colours {tuple(COLOURS)}, shapes {SHAPES}, directions {tuple(DIRECTIONS)}, got {prompt!r}"
            )
        ids.append([VOCABULARY.index(word) for word in match.groups()])
    return torch.tensor(ids)


def parse(prompt: str) -> tuple[str, str, str, str]:
    """(colour, shape, direction, camera) of a prompt of ``PROMPTS``, the camera as a key of ``CAMERAS``."""
    tokenize([prompt])
    colour, shape, direction, camera = _GRAMMAR.fullmatch(prompt).groups()
    return colour, shape, direction, camera.removeprefix("camera ")


def _texture(n: int, size: int, generator, device) -> torch.Tensor:
    """Smooth grey worlds [N, 1, size, size] in BACKGROUND +- TEXTURE: coarse noise, bicubically enlarged."""
    coarse = torch.randn(n, 1, size // 8, size // 8, generator=generator, device=device)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return BACKGROUND + TEXTURE * (smooth / 1.5).clamp(-1, 1)


def _draw(canvas, centre, radius, square, colour) -> torch.Tensor:
    """``canvas`` [N, 3, F, S, S] with one anti-aliased shape per video painted over it.

    centre: [N, F, 2] (row, column) in pixels; radius [N]; square [N] bool; colour [N, 3].
    """
    size = canvas.shape[-1]
    grid = torch.arange(size, dtype=torch.float32, device=canvas.device) + 0.5
    dy = grid[None, None, :, None] - centre[..., 0, None, None]
    dx = grid[None, None, None, :] - centre[..., 1, None, None]
    distance = torch.where(square[:, None, None, None], torch.maximum(dy.abs(), dx.abs()), torch.sqrt(dy**2 + dx**2))
    inside = (radius[:, None, None, None] - distance + 0.5).clamp(0, 1)[:, None]  # [N, 1, F, S, S]
    return canvas + inside * (colour[:, :, None, None, None] - canvas)


def render(
    prompts: list[str],
    frames: int = FRAMES,
    size: int = SIZE,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Videos of ``prompts`` [N, 3, frames, size, size] fp32 in [-1, 1] on ``device``; textures, camera start,
    speeds, sizes, positions and the distractors drawn from ``generator`` (on ``device``; torch's default when None).

    The prompted shape crosses the middle of the frame, travelling 30-45 % of the frame in the world over the clip;
    with the camera panning, the picture shows its motion relative to the camera.
    """
    fields = [parse(p) for p in prompts]
    n, last = len(prompts), max(frames - 1, 1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=device)

    def vectors(table: dict, keys: list[str]) -> torch.Tensor:
        return torch.tensor([table[key] for key in keys], device=device)

    pan = CAMERA_SPEED * last
    camera = vectors(CAMERAS, [f[3] for f in fields])  # [N, 2] unit steps
    world = _texture(n, size + pan, generator, device)
    # The crop's top-left corner per frame: it starts where the pan leaves room for, anywhere when still.
    start = torch.where(camera > 0, 0.0, torch.where(camera < 0, float(pan), (rand(n, 2) * (pan + 1)).floor()))
    t = torch.arange(frames, device=device)
    corner = (start[:, None, :] + camera[:, None, :] * CAMERA_SPEED * t[None, :, None]).long()  # [N, F, 2]
    rows = corner[..., 0, None] + torch.arange(size, device=device)  # [N, F, S]
    cols = corner[..., 1, None] + torch.arange(size, device=device)
    index = (rows[..., :, None] * world.shape[-1] + cols[..., None, :]).flatten(1)  # [N, F * S * S]
    background = world.flatten(1).gather(1, index).view(n, 1, frames, size, size).expand(n, 3, frames, size, size)

    # Positions in the frame move by (the world velocity - the camera's) a frame.
    drift = camera[:, None, :] * CAMERA_SPEED * t[None, :, None].float()  # [N, F, 2]
    canvas = background.clone()
    colour_names = list(COLOURS)
    for _ in range(DISTRACTORS):
        lead = torch.tensor([colour_names.index(f[0]) for f in fields], device=device)
        other = (lead + 1 + (rand(n) * (len(COLOURS) - 1)).long()) % len(COLOURS)  # never the prompted colour
        heading = torch.tensor(list(DIRECTIONS.values()), device=device)[(rand(n) * len(DIRECTIONS)).long()]
        speed = size * (0.15 + 0.25 * rand(n)) / last
        centre = (
            size * (0.15 + 0.7 * rand(n, 2))[:, None, :]
            + heading[:, None, :] * speed[:, None, None] * t[None, :, None]
            - drift
        )
        colour = torch.tensor(list(COLOURS.values()), device=device)[other]
        canvas = _draw(canvas, centre, size * (0.05 + 0.03 * rand(n)), rand(n) < 0.5, colour)

    heading = vectors(DIRECTIONS, [f[2] for f in fields])
    speed = size * (0.3 + 0.15 * rand(n)) / last
    seen = heading * speed[:, None] - camera * CAMERA_SPEED  # [N, 2] pixels a frame, in the picture
    across = size * (0.4 + 0.2 * rand(n))  # where on the other axis it crosses the middle (a pan moves it +-1/4)
    middle = size / 2 + (1 - heading.abs()) * (across[:, None] - size / 2)
    centre = middle[:, None, :] + seen[:, None, :] * (t[None, :, None] - last / 2)
    square = torch.tensor([f[1] == "square" for f in fields], device=device)
    radius = size * (0.09 + 0.04 * rand(n))
    return _draw(canvas, centre, radius, square, vectors(COLOURS, [f[0] for f in fields]))


def to_latent(video: torch.Tensor) -> torch.Tensor:
    """[N, 3, F, S, S] -> [N, 12, F, S/2, S/2]: each 2 x 2-pixel patch (of ``FOLD``) folded into channels."""
    n, c, f, h, w = video.shape
    a, b, d = FOLD
    folded = video.reshape(n, c, f // a, a, h // b, b, w // d, d).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return folded.reshape(n, c * a * b * d, f // a, h // b, w // d)


def from_latent(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_latent``: [N, 12, F, S/2, S/2] -> [N, 3, F, S, S]."""
    n, c, f, h, w = latent.shape
    a, b, d = FOLD
    unfolded = latent.reshape(n, c // (a * b * d), a, b, d, f, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return unfolded.reshape(n, c // (a * b * d), f * a, h * b, w * d)


def track(video: torch.Tensor, colour: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``colour`` is in each frame: (centre [N, F, 2] (row, column), area [N, F] in pixels) of the pixels
    close to it in [N, 3, F, S, S]; the centre is NaN where no pixel is.

    Distractors never take the prompted colour, so this follows the prompted shape.
    """
    target = torch.tensor(COLOURS[colour], device=video.device)[None, :, None, None, None]
    weight = (1 - (video - target).abs().amax(dim=1) / 0.5).clamp(min=0)  # [N, F, S, S]: 1 on the colour
    grid = torch.arange(video.shape[-1], dtype=torch.float32, device=video.device) + 0.5
    area = weight.sum(dim=(-1, -2))
    rows = (weight.sum(dim=-1) * grid).sum(dim=-1) / area
    cols = (weight.sum(dim=-2) * grid).sum(dim=-1) / area
    return torch.stack((rows, cols), dim=-1), area
