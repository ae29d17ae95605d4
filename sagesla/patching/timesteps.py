"""The timestep bucket of the transformer forward running now, for settings that follow the denoising step.

A forward pre-hook on each transformer reads its ``timestep`` argument ([B] or, for Wan2.2 TI2V, [B, S] per
token) and stores the bucket of its largest value. Attention processors inside that forward read ``bucket``.
Reading the value costs one device synchronisation per forward, so the hook is installed only where buckets exist.
"""

import bisect
from collections.abc import Sequence

import torch
from torch import nn


def bucket_of(timestep: float, edges: Sequence[float]) -> int:
    """Bucket i holds ``edges[i-1] <= timestep < edges[i]``; bucket 0 everything below ``edges[0]``."""
    return bisect.bisect_right(edges, timestep)


class TimestepTracker:
    """Follows the timestep of the forwards of the models it is attached to.

    Attributes:
        edges: ascending timestep edges between buckets (len(edges) + 1 buckets).
        timestep: the largest value of the running forward's ``timestep``, None before one or without it.
        bucket: ``bucket_of(timestep, edges)``, or None while ``timestep`` is None.
    """

    def __init__(self, edges: Sequence[float]):
        self.edges = tuple(edges)
        self.timestep: float | None = None
        self._handles: list = []

    @property
    def bucket(self) -> int | None:
        return None if self.timestep is None else bucket_of(self.timestep, self.edges)

    def attach(self, model: nn.Module) -> None:
        """Track ``model``'s forwards (a pre-hook that sees ``timestep`` as keyword or second positional)."""
        self._handles.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))

    def detach(self) -> None:
        """Remove every hook this tracker installed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.timestep = None if timestep is None else float(torch.as_tensor(timestep).max())
