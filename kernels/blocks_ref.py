"""Row-block helpers of the references: padding L to whole blocks and counting real rows; the math dtype."""

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or unchanged if float64: the references compute in fp32 and stay exact for float64 checks."""
    return x if x.dtype == torch.float64 else x.float()


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
