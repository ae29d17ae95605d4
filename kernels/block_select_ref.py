"""Reference block selection: top-S key blocks per query block from pooled scores."""

import torch

# Largest NK (padded to a power of two) the Triton selection holds in registers; more runs on the torch backend.
MAX_KEY_BLOCKS = 2048


def num_selected_blocks(topk: float, num_key_blocks: int) -> int:
    """Key blocks kept per query block: ``max(1, int(topk * NK))`` (thu-ml's rule, never zero)."""
    return max(1, int(topk * num_key_blocks))


def select_blocks_ref(q_pool: torch.Tensor, k_pool: torch.Tensor, topk: float) -> torch.Tensor:
    """Pick each query block's best key blocks by the dot product of pooled blocks.

    Neither a softmax scale nor a softmax changes a top-k, so the raw dot products rank the blocks.

    Args:
        q_pool: [B, H, NQ, D] fp32 mean of each Q block.
        k_pool: [B, H, NK, D] fp32 mean of each smoothed K block.
        topk: fraction of key blocks to keep, in (0, 1].
    Returns:
        lut: [B, H, NQ, S] int32 selected key-block indices in ascending order, S = max(1, int(topk * NK)).
        Equal scores go to the lowest indices (as in the Triton kernel), NaN scores rank last.
    """
    scores = q_pool @ k_pool.transpose(-1, -2)
    selected = num_selected_blocks(topk, k_pool.shape[-2])
    # A NaN score would make the choice arbitrary; rank it last so the choice stays well defined.
    scores = scores.nan_to_num(nan=float("-inf"))
    # A stable sort breaks ties by index: torch.topk leaves them unspecified (a zero query block or all-equal keys
    # tie every score, and the output then depends on which blocks are picked).
    index = scores.sort(dim=-1, descending=True, stable=True).indices[..., :selected]
    return index.sort(dim=-1).values.to(torch.int32)


def lut_to_mask(lut: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
    """[B, H, NQ, S] indices -> [B, H, NQ, NK] bool block mask."""
    mask = torch.zeros(*lut.shape[:-1], num_key_blocks, dtype=torch.bool, device=lut.device)
    return mask.scatter_(-1, lut.long(), True)
