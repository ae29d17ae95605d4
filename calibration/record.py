"""Online measurement: while a ``Recording`` is active, patched layers run dense attention and measure SageSLA.

Shapes: B batch, S tokens, H heads, D head dim (diffusers' (B, S, H, D)); NC candidates, NB timestep buckets.
Each attention call SLA could serve computes dense attention (returned, so the trajectory stays the dense model's)
and SageSLA at every candidate topk with the layer's own SLA module (its ``proj_l``, blocks and backend), compares
them in (B, S, H, D) and folds the errors into per-layer running statistics. Nothing of size S outlives the call.
"""

import importlib.metadata
import sys
from collections.abc import Sequence

import torch
from torch import nn

import sagesla
from sagesla import validation
from sagesla.kernels.block_select_ref import num_selected_blocks
from sagesla.patching.checkpoints import SLA_ATTRIBUTE
from sagesla.patching.patch import components
from sagesla.patching.timesteps import TimestepTracker
from sagesla.profile import LayerSpec, Measurements

DEFAULT_CANDIDATES = (0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)
# Measured statistic -> (per-call value it reduces, reduction over observations).
STATISTICS = {
    "rel_l1_max": ("rel_l1", "max"),
    "rel_l1_mean": ("rel_l1", "mean"),
    "cosine_min": ("cosine", "min"),
    "cosine_mean": ("cosine", "mean"),
    "head_rel_l1_max": ("head_rel_l1", "max"),
    "head_rel_l1_mean": ("head_rel_l1", "mean"),
    "head_cosine_min": ("head_cosine", "min"),
    "head_cosine_mean": ("head_cosine", "mean"),
}
_START = {"max": float("-inf"), "min": float("inf"), "mean": 0.0}
# Keeps 0 / 0 (an all-zero head) finite.
_TINY = 1e-30


def candidate_errors(
    sla: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dense: torch.Tensor,
    candidates: Sequence[float],
    kept: Sequence[int],
    **exact: object,
) -> dict[str, torch.Tensor]:
    """Errors of ``sla`` at each candidate topk against ``dense``, for one attention call.

    Candidates that keep the same number of key blocks compute the same thing, so each count runs once.

    Args:
        sla: the layer's SLA module (``tensor_layout="NHD"``).
        query, key, value: (B, S, H, D) as the layer's attention receives them.
        dense: (B, S, H, D) dense attention of the same call.
        candidates: NC topk values.
        kept: for each candidate, the key blocks it keeps per query block.
        exact: a joint text+video call's ``exact_kv`` / ``exact_mask`` (the text keys every query attends), handed
            to ``sla`` with each candidate.
    Returns:
        {"rel_l1", "cosine": [NC, B] fp32 over a batch row; "head_rel_l1", "head_cosine": [NC, B, H] per head}.
    """
    ref = dense.float()
    ref_abs, ref_sq = ref.abs().sum(dim=(1, 3)), ref.square().sum(dim=(1, 3))
    by_count: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for topk, blocks in zip(candidates, kept, strict=True):
        if blocks not in by_count:
            out = sla(query, key, value, topk=topk, **exact).float()
            by_count[blocks] = (
                (out - ref).abs().sum(dim=(1, 3)),
                (out * ref).sum(dim=(1, 3)),
                out.square().sum(dim=(1, 3)),
            )
    diff, dot, out_sq = (torch.stack([by_count[blocks][i] for blocks in kept]) for i in range(3))
    return {
        "rel_l1": diff.sum(-1) / ref_abs.sum(-1).clamp_min(_TINY),
        "cosine": dot.sum(-1) / (out_sq.sum(-1) * ref_sq.sum(-1)).sqrt().clamp_min(_TINY),
        "head_rel_l1": diff / ref_abs.clamp_min(_TINY),
        "head_cosine": dot / (out_sq * ref_sq).sqrt().clamp_min(_TINY),
    }


def environment(device: torch.device) -> dict[str, str | None]:
    """Versions and device name recorded in a profile."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"sagesla": sagesla.__version__, "torch": torch.__version__, "triton": triton, "device": name}


class _LayerStats:
    """Running statistics of one layer: observation counts and [NB, NC(, H)] reductions, on the calls' device."""

    def __init__(self, buckets: int, candidates: int):
        self.calls = [0] * buckets
        self.sparsity = torch.zeros(buckets, candidates, dtype=torch.float64)
        self.values: dict[str, torch.Tensor] = {}

    def add(self, bucket: int, sparsity: list[float], errors: dict[str, torch.Tensor]) -> None:
        """Fold one call in: ``errors`` as ``candidate_errors`` returns them, ``sparsity`` [NC] per candidate."""
        rows = errors["rel_l1"].shape[1]
        self.calls[bucket] += rows
        self.sparsity[bucket] += torch.tensor(sparsity, dtype=torch.float64) * rows
        for name, (source, reduction) in STATISTICS.items():
            value = errors[source]
            if name not in self.values:
                shape = (len(self.calls), *value.shape[:1], *value.shape[2:])
                self.values[name] = torch.full(shape, _START[reduction], device=value.device)
            total = self.values[name][bucket]
            if reduction == "max":
                torch.maximum(total, value.amax(dim=1), out=total)
            elif reduction == "min":
                torch.minimum(total, value.amin(dim=1), out=total)
            else:
                total += value.sum(dim=1)


class Progress:
    """tqdm over steps (``unit``) when installed; otherwise a one-line counter on stderr. Silent when not
    ``enabled``."""

    def __init__(self, total: int | None, enabled: bool, description: str = "calibrating", unit: str = "call"):
        self.total, self.count, self.bar = total, 0, None
        self.enabled, self.description, self.unit = enabled, description, unit
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=description, unit=unit)

    def update(self) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            counted = f"{self.count}/{self.total or '?'} {self.unit}s"
            print(f"\r{self.description}: {counted}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.count:
            print(file=sys.stderr)


class Recording:
    """Context manager: measure SageSLA against dense attention in every patched layer while the model runs.

    Inside the ``with`` block every self-attention call the SLA processor would serve runs diffusers' dense
    attention (so the model computes exactly what the unpatched model computes) and evaluates each candidate topk
    with the layer's SLA module; calls that fall back to dense attention anyway (see ``sagesla.patch``) are not
    measured. Run any sampling loop or pipeline inside; set ``active = False`` to skip steps.

    Args:
        model_or_pipeline: a model or pipeline patched by ``sagesla.patch`` (its SLA settings and ``proj_l`` are
            what gets measured); all its SLA layers must share one head count and one set of SLA settings.
        candidates: topk values to evaluate, each in (0, 1]; 1.0 (no block skipped) is always added.
        bucket_edges: ascending timestep edges; a call counts in the bucket of its forward's ``timestep``.
        total: expected number of calls, for the progress bar (the attribute can be set before entering).
        progress: show a progress bar over calls (tqdm when installed).
    Attributes:
        layers: the fingerprint of the SLA layers measured (``LayerSpec`` each), in model order.
        attention: their SLA settings (``SLASettings`` resolved for the device).
        active: measure calls (True) or only run them dense (False).
    Example:
        >>> sagesla.patch(pipe, topk=1.0)
        >>> with Recording(pipe, bucket_edges=[500.0]) as recording:
        ...     pipe(prompts, num_inference_steps=10)
        >>> profile = choose(recording.measurements(), budget=0.05)
    """

    def __init__(
        self,
        model_or_pipeline: object,
        candidates: Sequence[float] = DEFAULT_CANDIDATES,
        bucket_edges: Sequence[float] = (),
        total: int | None = None,
        progress: bool = True,
    ):
        for i, candidate in enumerate(candidates):
            validation.check_topk(candidate, name=f"candidates[{i}]")
        self.candidates = tuple(sorted({float(c) for c in candidates} | {1.0}))
        self.bucket_edges = tuple(float(edge) for edge in bucket_edges)
        if list(self.bucket_edges) != sorted(set(self.bucket_edges)):
            raise ValueError(f"`bucket_edges` must be strictly ascending, got {list(bucket_edges)}")
        self.target = model_or_pipeline
        self.active = True
        self.total, self._show_progress = total, progress
        self._processors = self._find_processors()
        self.layers = tuple(layer for layer, _ in self._processors)
        self._names = {layer.name: i for i, (layer, _) in enumerate(self._processors)}
        self._stats = [_LayerStats(len(self.bucket_edges) + 1, len(self.candidates)) for _ in self._processors]
        self._tokens: set[int] = set()
        self._tracker = TimestepTracker(self.bucket_edges) if self.bucket_edges else None

    def _find_processors(self) -> list[tuple[LayerSpec, object]]:
        """(fingerprint entry, processor) of every SLA layer; sets ``attention`` and the device."""
        from sagesla.patching import families

        found, settings = [], set()
        for prefix, model in components(self.target):
            self._device = next(model.parameters()).device
            for name, module in model.named_modules():
                if isinstance(getattr(module, "processor", None), families.SLAProcessor):
                    found.append((families.layer_spec(prefix + name, module), module.processor))
                    settings.add(getattr(module, SLA_ATTRIBUTE).settings.resolve(self._device))
        if not found:
            raise ValueError("`model_or_pipeline` has no SLA layer: sagesla.patch it first (any topk)")
        if len(settings) != 1 or len({layer.heads for layer, _ in found}) != 1:
            raise ValueError(f"the SLA layers must share one head count and one set of SLA settings, got {settings}")
        self.attention = settings.pop()
        return found

    def __enter__(self) -> "Recording":
        self._progress = Progress(self.total, self._show_progress)
        for _, processor in self._processors:
            processor.observer = self._observe
        if self._tracker is not None:
            for _, model in components(self.target):
                self._tracker.attach(model)
        return self

    def __exit__(self, *exc) -> None:
        for _, processor in self._processors:
            processor.observer = None
        if self._tracker is not None:
            self._tracker.detach()
        self._progress.close()

    def _observe(
        self,
        layer_name: str,
        sla: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        dense: torch.Tensor,
        **exact: object,
    ) -> None:
        """The processors' observer: one attention call, all tensors (B, S, H, D); ``exact``: a joint call's text keys
        (``SLAProcessor``'s observer)."""
        if not self.active:
            return
        bucket = 0 if self._tracker is None else self._tracker.bucket
        if bucket is None:
            raise RuntimeError("calibration with timestep buckets needs the model called with a `timestep`")
        length = query.shape[1]
        key_blocks = -(-length // sla.settings.resolve(query.device).block_k)
        kept = [num_selected_blocks(topk, key_blocks) for topk in self.candidates]
        errors = candidate_errors(sla, query, key, value, dense, self.candidates, kept, **exact)
        self._stats[self._names[layer_name]].add(bucket, [1.0 - blocks / key_blocks for blocks in kept], errors)
        self._tokens.add(length)
        self._progress.update()

    def measurements(self, **info: object) -> "Measurements":
        """What was measured so far, on CPU; ``info`` (JSON-serializable) is stored with it.

        Raises:
            ValueError: a layer or timestep bucket without any measured call (names them all).
        """
        empty = [
            f"{layer.name} bucket {bucket}"
            for (layer, _), stats in zip(self._processors, self._stats, strict=True)
            for bucket, calls in enumerate(stats.calls)
            if calls == 0
        ]
        if empty:
            raise ValueError(
                f"no measured call for {empty} (bucket edges {list(self.bucket_edges)}): record steps in every "
                "bucket, use fewer buckets, and check the 'sagesla' log for layers that fell back to dense attention"
            )
        calls = torch.tensor([stats.calls for stats in self._stats], dtype=torch.int64)
        measured = {}
        for name, (_, reduction) in STATISTICS.items():
            value = torch.stack([stats.values[name].cpu() for stats in self._stats]).float()
            measured[name] = (
                value / calls.view(*calls.shape, *[1] * (value.dim() - 2)) if reduction == "mean" else value
            )
        sparsity = torch.stack([stats.sparsity for stats in self._stats]) / calls[..., None]
        return Measurements(
            model_class=type(self.target).__name__,
            layers=self.layers,
            attention=self.attention,
            candidates=self.candidates,
            bucket_edges=self.bucket_edges,
            calls=calls,
            sparsity=sparsity.float(),
            info={"tokens": sorted(self._tokens), "environment": environment(self._device), **info},
            **measured,
        )
