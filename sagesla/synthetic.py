"""Video-like attention inputs: tokens on a frames x height x width grid with local structure.

Real video DiT attention is dominated by nearby tokens (in space and time) plus a few global ones. Here Q and K
share random Fourier features of the token's (t, y, x) position, so ``q . k`` approximates a Gaussian kernel of
the distance between tokens; V is a smooth field over the grid. Noise keeps it from being purely positional.
"""

import math

import torch


def _fourier_features(coords: torch.Tensor, dim: int, length_scale: float, gen: torch.Generator) -> torch.Tensor:
    """coords [L, 3] -> [L, dim] features whose inner products approximate exp(-|x - y|^2 / (2 length_scale^2))."""
    freqs = torch.randn(3, dim, generator=gen) / length_scale
    phase = torch.rand(dim, generator=gen) * 2 * math.pi
    return math.sqrt(2.0 / dim) * torch.cos(coords @ freqs + phase)


def video_like_qkv(
    batch: int = 1,
    heads: int = 4,
    frames: int = 8,
    height: int = 16,
    width: int = 16,
    head_dim: int = 64,
    *,
    sharpness: float = 6.0,
    noise: float = 0.3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V of shape [batch, heads, frames * height * width, head_dim] (HND), tokens in (t, y, x) raster order.

    Each head gets its own length scale (some heads local, some wider), so a single top-k suits no head exactly.
    ``sharpness`` scales the positional part of Q and K (larger = peakier attention).
    """
    gen = torch.Generator().manual_seed(seed)
    t, y, x = torch.meshgrid(
        torch.arange(frames, dtype=torch.float32),
        torch.arange(height, dtype=torch.float32),
        torch.arange(width, dtype=torch.float32),
        indexing="ij",
    )
    coords = torch.stack([t, y, x], dim=-1).reshape(-1, 3)
    length = coords.shape[0]
    q = torch.empty(batch, heads, length, head_dim)
    k, v = torch.empty_like(q), torch.empty_like(q)
    for h in range(heads):
        scale = 1.5 * 2 ** (h % 4 * 0.75)
        pos = _fourier_features(coords, head_dim, scale, gen) * math.sqrt(head_dim) * sharpness**0.5
        field = _fourier_features(coords, head_dim, 4.0, gen) * math.sqrt(head_dim)
        for b in range(batch):
            q[b, h] = pos + noise * torch.randn(length, head_dim, generator=gen)
            # A shared offset on K, as real keys have: smoothing K removes it before quantizing.
            offset = 0.5 * torch.randn(head_dim, generator=gen)
            k[b, h] = pos + noise * torch.randn(length, head_dim, generator=gen) + offset
            v[b, h] = field + noise * torch.randn(length, head_dim, generator=gen)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)
