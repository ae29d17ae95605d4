"""Row-block helpers of the references: padding L to whole blocks and counting real rows."""

import torch


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad dim -2 of ``x`` ([..., L, D]) to ``rows`` rows."""
    extra = rows - x.shape[-2]
    return x if extra == 0 else torch.nn.functional.pad(x, (0, 0, 0, extra))


def to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, N, block, D], zero-padding the tail block."""
    n = -(-x.shape[-2] // block)
    return pad_rows(x, n * block).unflatten(-2, (n, block))


def block_rows(length: int, block: int, device: torch.device) -> torch.Tensor:
    """Number of real rows in each of the ceil(length / block) blocks: [N] fp32."""
    starts = torch.arange(0, length, block, device=device)
    return (length - starts).clamp(max=block).float()
