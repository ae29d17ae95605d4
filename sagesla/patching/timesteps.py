"""The timestep bucket of the transformer forward running now, for settings that follow the denoising step.

A forward pre-hook on each transformer reads its ``timestep`` argument ([B] or, for Wan2.2 TI2V, [B, S] per
token) and keeps its largest value, per thread: forwards running at once in several threads each see their own.
The hook stores a tensor (no device synchronisation, traceable by ``torch.compile``); ``bucket`` reads it once per
forward in eager mode, and compiled code picks the bucket on the device (``bucket_index``).
"""

import bisect
import threading
from collections.abc import Sequence

import torch
from torch import nn


def bucket_of(timestep: float, edges: Sequence[float]) -> int:
    """Bucket i holds ``edges[i-1] <= timestep < edges[i]``; bucket 0 everything below ``edges[0]``."""
    return bisect.bisect_right(edges, timestep)


class TimestepTracker:
    """Follows the timestep of the forwards of the models it is attached to, separately in each thread.

    Attributes:
        edges: ascending timestep edges between buckets (len(edges) + 1 buckets).
    """

    def __init__(self, edges: Sequence[float]):
        self.edges = tuple(edges)
        self._local = threading.local()
        self._handles: list = []

    @property
    def timestep(self) -> torch.Tensor | None:
        """The largest value of this thread's running forward's ``timestep`` (a 0-d tensor), None without one."""
        return getattr(self._local, "timestep", None)

    @property
    def bucket(self) -> int | None:
        """``bucket_of`` this thread's running forward's timestep (read from the device once per forward), or None."""
        if getattr(self._local, "bucket", None) is None and self.timestep is not None:
            self._local.bucket = bucket_of(float(self.timestep), self.edges)
        return getattr(self._local, "bucket", None)

    def bucket_index(self, timestep: torch.Tensor) -> torch.Tensor:
        """``bucket_of`` on the device: a 0-d int64 tensor, for code that must not synchronise (compiled graphs)."""
        edges = torch.tensor(self.edges, dtype=torch.float64, device=timestep.device)
        return torch.bucketize(timestep.to(torch.float64), edges, right=True)

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
        self._local.timestep = None if timestep is None else torch.as_tensor(timestep).detach().max()
        self._local.bucket = None
