"""The timestep of the transformer forward running now, for settings that follow the denoising step.

A forward pre-hook on each transformer reads its ``timestep`` argument ([B] or, for Wan2.2 TI2V, [B, S] per
token) and keeps its largest value, per thread: forwards running at once in several threads each see their own.
The hook stores a tensor (no device synchronisation, traceable by ``torch.compile``); ``bucket`` and ``is_dense``
read it once per forward in eager mode, and compiled code decides on the device (``bucket_index``,
``dense_flag``). One tracker serves both a profile's timestep buckets and ``dense_steps``.

``dense_timesteps`` turns "the first / last N steps" of a sampler into the timestep ranges ``dense_steps`` takes.
"""

import bisect
import math
import numbers
import threading
from collections.abc import Sequence

import torch
from torch import nn

from sagesla import validation


def bucket_of(timestep: float, edges: Sequence[float]) -> int:
    """Bucket i holds ``edges[i-1] <= timestep < edges[i]``; bucket 0 everything below ``edges[0]``."""
    return bisect.bisect_right(edges, timestep)


def in_ranges(timestep: float, ranges: Sequence[tuple[float, float]]) -> bool:
    """Whether ``low <= timestep <= high`` for one of the (low, high) ``ranges``."""
    return any(low <= timestep <= high for low, high in ranges)


def _timestep_value(name: str, value: object) -> float:
    """A real number (not a bool; a one-element tensor is read) that is not NaN, as a float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a timestep (a real number), got {type(value).__name__} {value!r:.80}")
    if math.isnan(value):
        raise ValueError(f"`{name}` must be a timestep, got NaN")
    return float(value)


def _is_sequence(value: object) -> bool:
    return isinstance(value, (Sequence, torch.Tensor)) and not isinstance(value, (str, bytes))


def check_dense_steps(dense_steps: object) -> tuple[tuple[float, float], ...]:
    """``dense_steps`` as a tuple of (low, high) float ranges: None (none), one ``(low, high)`` pair, or a sequence
    of pairs, in the scheduler's timestep units (``low``, ``high`` may be infinite).

    Raises TypeError / ValueError naming ``dense_steps`` (and the entry at fault) and what arrived: not a pair or a
    sequence of pairs, a bound that is not a number or is NaN, ``low > high``, an empty sequence.
    """
    if dense_steps is None:
        return ()
    if not _is_sequence(dense_steps):
        raise TypeError(
            "`dense_steps` must be a timestep range (low, high) or a list of them, e.g. (900.0, 1000.0), got "
            f"{type(dense_steps).__name__} {dense_steps!r:.80}"
        )
    if len(dense_steps) == 0:
        raise ValueError("`dense_steps` must hold at least one range (low, high), got an empty sequence (None: none)")
    single = not _is_sequence(dense_steps[0]) or (
        isinstance(dense_steps[0], torch.Tensor) and dense_steps[0].numel() == 1
    )
    ranges = []
    for i, pair in enumerate([dense_steps] if single else dense_steps):
        where = "dense_steps" if single else f"dense_steps[{i}]"
        if not _is_sequence(pair) or len(pair) != 2:
            raise ValueError(
                f"`{where}` must be a timestep range (low, high), e.g. (900.0, 1000.0), got {type(pair).__name__} "
                f"{pair!r:.80}"
            )
        low, high = (_timestep_value(f"{where}[{j}]", value) for j, value in enumerate(pair))
        if low > high:
            raise ValueError(f"`{where}` must be a range (low, high) with low <= high, got ({low!r}, {high!r})")
        ranges.append((low, high))
    return tuple(ranges)


def dense_timesteps(
    timesteps: Sequence[float] | torch.Tensor, *, first: int = 0, last: int = 0
) -> list[tuple[float, float]]:
    """The timestep ranges for ``sagesla.patch(..., dense_steps=...)`` that cover the first / last steps of a sampler.

    A transformer forward sees a timestep, not a step number, so "the first N steps" becomes the range of their
    timesteps: ``(min, max)`` of ``timesteps[:first]``, and of ``timesteps[-last:]``. The sampler's timesteps
    are monotone (descending in every diffusers scheduler), so a range holds exactly the steps it was made of; a
    scheduler that runs one timestep twice (Heun) is dense at both calls.

    Args:
        timesteps: the timesteps the sampler will run, in order (a sequence, tensor or numpy array):
            ``pipe.scheduler.timesteps`` after ``pipe.scheduler.set_timesteps(num_inference_steps)`` (the pipeline
            computes the same ones).
        first, last: how many steps at the start / at the end run dense (ints >= 0).
    Returns:
        a list of (low, high) float ranges, empty when ``first == last == 0``, one range when they meet.
    Raises:
        TypeError / ValueError: ``timesteps`` not numbers, empty or not monotone; ``first`` / ``last`` not ints in
            [0, len(timesteps)].
    Example:
        >>> pipe.scheduler.set_timesteps(50)
        >>> sagesla.patch(pipe, topk=0.1, dense_steps=dense_timesteps(pipe.scheduler.timesteps, first=2))
    """
    if not isinstance(timesteps, (torch.Tensor, Sequence)) and hasattr(timesteps, "__array__"):
        timesteps = torch.as_tensor(timesteps)  # a numpy array
    if isinstance(timesteps, torch.Tensor):
        values = timesteps.detach().cpu().to(torch.float64).flatten().tolist()
    elif not _is_sequence(timesteps):
        raise TypeError(f"`timesteps` must be a sequence or 1-D tensor of timesteps, got {type(timesteps).__name__}")
    else:
        values = [_timestep_value(f"timesteps[{i}]", value) for i, value in enumerate(timesteps)]
    if not values or any(math.isnan(value) for value in values):
        raise ValueError(f"`timesteps` must hold at least one timestep and no NaN, got {values!r:.200}")
    if values != sorted(values) and values != sorted(values, reverse=True):
        raise ValueError(f"`timesteps` must be monotone (the order the sampler runs them), got {values!r:.200}")
    for name, count in (("first", first), ("last", last)):
        if not validation.is_number(count, int) or not 0 <= count <= len(values):
            raise ValueError(
                f"`{name}` must be an int in [0, {len(values)}] (steps of `timesteps`), got {type(count).__name__} "
                f"{count!r}"
            )
    if first + last >= len(values):
        return [(min(values), max(values))]
    chosen = [values[:first], values[len(values) - last :]]
    return [(min(steps), max(steps)) for steps in chosen if steps]


class TimestepTracker:
    """Follows the timestep of the forwards of the models it is attached to, separately in each thread.

    Attributes:
        edges: ascending timestep edges between buckets (len(edges) + 1 buckets).
        dense_ranges: (low, high) timestep ranges whose forwards run dense attention (``dense_steps``).
    """

    def __init__(self, edges: Sequence[float] = (), dense_ranges: Sequence[tuple[float, float]] = ()):
        self.edges = tuple(edges)
        self.dense_ranges = tuple((float(low), float(high)) for low, high in dense_ranges)
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

    @property
    def is_dense(self) -> bool:
        """Whether this thread's running forward's timestep lies in ``dense_ranges`` (read once per forward); False
        without ranges or without a timestep."""
        if not self.dense_ranges or self.timestep is None:
            return False
        if getattr(self._local, "dense", None) is None:
            self._local.dense = in_ranges(float(self.timestep), self.dense_ranges)
        return self._local.dense

    def dense_flag(self, timestep: torch.Tensor) -> torch.Tensor:
        """``in_ranges`` on the device: a 0-d bool tensor, for code that must not synchronise (compiled graphs)."""
        ranges = torch.tensor(self.dense_ranges, dtype=torch.float64, device=timestep.device)
        value = timestep.to(torch.float64)
        return ((ranges[:, 0] <= value) & (value <= ranges[:, 1])).any()

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
        self._local.dense = None
