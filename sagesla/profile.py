"""Calibration profiles: the per-layer topk ``sagesla.calibration`` chose, with what it measured, in one file.

Shape letters: NL self-attention layers (model order), NB timestep buckets, NC candidate topk values (ascending),
H heads per layer. Errors compare SLA's attention output with dense attention's, per call, in the layer's
(B, S, H, D) space: rel-L1 ``sum|o - ref| / sum|ref|`` and cosine similarity, each over a whole batch row of one
call ("layer") or over one head of it ("head"); an observation is one batch row of one attention call.

File: safetensors, tensors on CPU (see ``TENSORS``), and a header whose metadata holds ``format``
("sagesla.profile"), ``schema_version``, ``sha256`` (of the tensors) and ``profile`` (JSON: model class, layer
fingerprint, SLA settings, candidates, bucket edges, selection rule, environment). ``load_profile`` checks all of
it and builds the ``Profile`` only when everything is right: a bad file raises ``ProfileError``, never half-loads.
"""

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

FORMAT = "sagesla.profile"
SCHEMA_VERSION = 1
METRICS = ("rel_l1", "cosine")

# Measured tensors: name -> (dtype, shape letters).
MEASURED = {
    "calls": (torch.int64, "LB"),
    "sparsity": (torch.float32, "LBC"),
    "rel_l1_max": (torch.float32, "LBC"),
    "rel_l1_mean": (torch.float32, "LBC"),
    "cosine_min": (torch.float32, "LBC"),
    "cosine_mean": (torch.float32, "LBC"),
    "head_rel_l1_max": (torch.float32, "LBCH"),
    "head_rel_l1_mean": (torch.float32, "LBCH"),
    "head_cosine_min": (torch.float32, "LBCH"),
    "head_cosine_mean": (torch.float32, "LBCH"),
}
# Chosen tensors: name -> (dtype, shape letters).
# topk in float64, so each value equals its candidate's Python float.
CHOSEN = {"topk": (torch.float64, "LB"), "head_topk": (torch.float64, "LBH"), "met": (torch.bool, "LB")}
TENSORS = {**MEASURED, **CHOSEN}


class ProfileError(ValueError):
    """A profile file that cannot be read, or a profile that does not fit the model it is applied to."""


class LayerSpec(NamedTuple):
    """One self-attention layer of the fingerprint: module name (as ``sagesla.patch`` reports it) and shape."""

    name: str
    heads: int
    head_dim: int


@dataclass(frozen=True)
class AttentionSettings:
    """The SLA settings the candidates ran with (``block_q`` / ``block_k`` resolved for the device).

    ``sagesla.patch`` must use the same quantization, blocks, linear scope and feature map: they change what a topk
    computes. ``backend`` and ``pv_precision`` are recorded for the reader.
    """

    quantized: bool
    block_q: int
    block_k: int
    linear_scope: str
    feature_map: str
    backend: str
    pv_precision: str


# The settings patch checks against a profile.
CHECKED_SETTINGS = ("quantized", "block_q", "block_k", "linear_scope", "feature_map")


def _check_tensor(name: str, tensor: object, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ProfileError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise ProfileError(
            f"`{name}` must be {dtype} of shape {shape}, got {tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ProfileError(f"`{name}` holds NaN/Inf")


@dataclass(frozen=True, eq=False)
class Measurements:
    """What a calibration run measured for every layer, timestep bucket, candidate topk and head.

    Attributes:
        model_class: class name of the calibrated model (or pipeline).
        layers: the fingerprint, one ``LayerSpec`` per self-attention layer (NL); every layer has H heads.
        attention: the SLA settings of the candidates.
        candidates: NC topk values, strictly ascending in (0, 1].
        bucket_edges: NB - 1 ascending timestep edges; bucket i holds timesteps t with
            ``edges[i-1] <= t < edges[i]`` (bucket 0: below the first edge).
        calls: [NL, NB] int64 observations (batch rows of attention calls), each >= 1.
        sparsity: [NL, NB, NC] mean fraction of (query block, key block) pairs skipped.
        rel_l1_max, rel_l1_mean: [NL, NB, NC] worst and mean rel-L1 of a layer's output over observations.
        cosine_min, cosine_mean: [NL, NB, NC] worst and mean cosine similarity.
        head_rel_l1_max, head_rel_l1_mean, head_cosine_min, head_cosine_mean: [NL, NB, NC, H] the same per head.
        info: JSON-serializable facts of the run (tokens, steps, environment) for the reader.
    """

    model_class: str
    layers: tuple[LayerSpec, ...]
    attention: AttentionSettings
    candidates: tuple[float, ...]
    bucket_edges: tuple[float, ...]
    calls: torch.Tensor
    sparsity: torch.Tensor
    rel_l1_max: torch.Tensor
    rel_l1_mean: torch.Tensor
    cosine_min: torch.Tensor
    cosine_mean: torch.Tensor
    head_rel_l1_max: torch.Tensor
    head_rel_l1_mean: torch.Tensor
    head_cosine_min: torch.Tensor
    head_cosine_mean: torch.Tensor
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layers or len({layer.heads for layer in self.layers}) != 1:
            raise ProfileError(f"`layers` must be non-empty with one head count, got {list(self.layers)}")
        if len({layer.name for layer in self.layers}) != len(self.layers):
            raise ProfileError(f"`layers` names must be unique, got {[layer.name for layer in self.layers]}")
        candidates, edges = self.candidates, self.bucket_edges
        if not candidates or any(not 0 < c <= 1 for c in candidates) or list(candidates) != sorted(set(candidates)):
            raise ProfileError(f"`candidates` must be strictly ascending values in (0, 1], got {list(candidates)}")
        if any(not math.isfinite(e) for e in edges) or list(edges) != sorted(set(edges)):
            raise ProfileError(f"`bucket_edges` must be strictly ascending finite values, got {list(edges)}")
        for name, (dtype, letters) in MEASURED.items():
            _check_tensor(name, getattr(self, name), dtype, self.shape(letters))
        if bool((self.calls < 1).any()):
            raise ProfileError("`calls` must be >= 1 for every layer and bucket (a bucket with no observation?)")

    def shape(self, letters: str) -> tuple[int, ...]:
        """The shape for letters of "LBCH" (layers, buckets, candidates, heads)."""
        sizes = {
            "L": len(self.layers),
            "B": len(self.bucket_edges) + 1,
            "C": len(self.candidates),
            "H": self.layers[0].heads,
        }
        return tuple(sizes[letter] for letter in letters)


@dataclass(frozen=True)
class Selection:
    """How the topk were chosen.

    Attributes:
        metric: "rel_l1" (budget bounds the worst rel-L1) or "cosine" (budget bounds the worst 1 - cosine).
        budget: the bound every calibration observation met at the chosen topk (where ``met``).
        per_head: the bound was applied to every head (else to each layer's whole output).
        target_sparsity: the mean sparsity asked for, when the budget was derived from it; else None.
    """

    metric: str
    budget: float
    per_head: bool = False
    target_sparsity: float | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ProfileError(f"`metric` must be one of {METRICS}, got {self.metric!r}")
        if not (isinstance(self.budget, float) and math.isfinite(self.budget) and self.budget >= 0):
            raise ProfileError(f"`budget` must be a finite float >= 0, got {self.budget!r}")


@dataclass(frozen=True, eq=False)
class Profile:
    """A calibration profile: per-layer (and per-bucket) topk for ``sagesla.patch``, and the measurements.

    Attributes:
        measurements: what was measured (``Measurements``).
        selection: how topk was chosen (``Selection``).
        topk: [NL, NB] float64, the topk ``sagesla.patch`` applies to each layer in each timestep bucket; every
            value is one of the candidates.
        head_topk: [NL, NB, H] float64, each head's own smallest topk meeting the budget. The kernels take one
            topk per call, so patch applies ``topk``; this is for the reader (and per-head kernels later).
        met: [NL, NB] bool, False where no candidate met the budget (``topk`` is then the largest candidate).
    Example:
        >>> profile = sagesla.calibration.load_profile("wan.profile.safetensors")
        >>> sagesla.patch(model, profile=profile)
    """

    measurements: Measurements
    selection: Selection
    topk: torch.Tensor
    head_topk: torch.Tensor
    met: torch.Tensor

    def __post_init__(self) -> None:
        for name, (dtype, letters) in CHOSEN.items():
            _check_tensor(name, getattr(self, name), dtype, self.measurements.shape(letters))
        candidates = torch.tensor(self.measurements.candidates, dtype=torch.float64)
        for name in ("topk", "head_topk"):
            if not bool(torch.isin(getattr(self, name), candidates).all()):
                raise ProfileError(f"`{name}` values must be among the candidates {list(self.measurements.candidates)}")

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        return self.measurements.layers

    @property
    def bucket_edges(self) -> tuple[float, ...]:
        return self.measurements.bucket_edges

    def bucket_label(self, bucket: int) -> str:
        """The timesteps t of a bucket, e.g. "t < 500", "500 <= t < 800", "800 <= t"."""
        edges = self.bucket_edges
        low = "" if bucket == 0 else f"{edges[bucket - 1]:.4g} <= "
        return f"{low}t" + ("" if bucket == len(edges) else f" < {edges[bucket]:.4g}")

    def layer_topk(self) -> dict[str, tuple[float, ...]]:
        """{layer name: topk per timestep bucket}."""
        return {layer.name: tuple(row.tolist()) for layer, row in zip(self.layers, self.topk, strict=True)}

    def chosen(self, name: str) -> torch.Tensor:
        """Measured tensor ``name`` (e.g. "rel_l1_max") at the chosen topk: [NL, NB], or [NL, NB, H] per head."""
        value = getattr(self.measurements, name)
        index = torch.searchsorted(torch.tensor(self.measurements.candidates, dtype=torch.float64), self.topk)
        index = index.view(*index.shape, 1, *[1] * (value.dim() - 3)).expand(*index.shape, 1, *value.shape[3:])
        return value.gather(2, index).squeeze(2)

    def mean_sparsity(self) -> float:
        """Sparsity at the chosen topk, averaged over every layer's observations."""
        calls = self.measurements.calls.double()
        return float((self.chosen("sparsity").double() * calls).sum() / calls.sum())

    def check_fits(self, model_class: str, layers: Sequence[LayerSpec], settings: Mapping[str, object]) -> None:
        """Raise ``ProfileError`` listing every difference from a model's fingerprint and SLA settings.

        Args:
            model_class: class name of the model (or pipeline) to patch.
            layers: its self-attention layers.
            settings: the SLA settings to patch with, a subset of ``CHECKED_SETTINGS``.
        """
        problems = []
        if model_class != self.measurements.model_class:
            problems.append(f"model class: profile {self.measurements.model_class!r}, model {model_class!r}")
        for key, value in settings.items():
            recorded = getattr(self.measurements.attention, key)
            if value != recorded:
                problems.append(f"{key}: profile {recorded!r}, patch {value!r}")
        ours = {layer.name: layer for layer in self.layers}
        theirs = {layer.name: layer for layer in layers}
        for name in [*ours, *(name for name in theirs if name not in ours)]:
            if name not in theirs:
                problems.append(f"layer {name!r}: in the profile, not in the model")
            elif name not in ours:
                problems.append(f"layer {name!r}: in the model, not in the profile")
            elif ours[name][1:] != theirs[name][1:]:
                (_, heads, dim), (_, model_heads, model_dim) = ours[name], theirs[name]
                problems.append(
                    f"layer {name!r}: heads x head_dim {heads}x{dim} in the profile, {model_heads}x{model_dim} in "
                    "the model"
                )
        if problems:
            listed = "".join(f"\n  - {problem}" for problem in problems)
            raise ProfileError(f"the profile does not fit the model ({len(problems)} mismatch(es)):{listed}")

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile to ``path`` (safetensors), atomically: complete or not at all."""
        from sagesla.patching.checkpoints import save_file_atomic

        tensors = self._tensors()
        metadata = {
            "format": FORMAT,
            "schema_version": str(SCHEMA_VERSION),
            "sha256": _digest(tensors),
            "profile": json.dumps(self._header()),
        }
        save_file_atomic(tensors, path, metadata)

    def _tensors(self) -> dict[str, torch.Tensor]:
        owners = {**dict.fromkeys(MEASURED, self.measurements), **dict.fromkeys(CHOSEN, self)}
        return {name: getattr(owner, name).detach().cpu().contiguous() for name, owner in owners.items()}

    def _header(self) -> dict:
        m = self.measurements
        return {
            "model_class": m.model_class,
            "layers": [list(layer) for layer in m.layers],
            "attention": asdict(m.attention),
            "candidates": list(m.candidates),
            "bucket_edges": list(m.bucket_edges),
            "selection": asdict(self.selection),
            "info": m.info,
        }


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors serialized alone (safetensors' byte layout is deterministic)."""
    return hashlib.sha256(save(tensors)).hexdigest()


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as error:
        raise ProfileError(
            f"profile {str(path)!r} is not a readable safetensors file (truncated? corrupted?): {error}"
        ) from error
    return metadata, tensors


def _build(header: dict, tensors: dict[str, torch.Tensor]) -> Profile:
    """The ``Profile`` of a parsed header and its tensors (raises KeyError / TypeError on a malformed header)."""
    measurements = Measurements(
        model_class=str(header["model_class"]),
        layers=tuple(LayerSpec(str(name), int(heads), int(dim)) for name, heads, dim in header["layers"]),
        attention=AttentionSettings(**header["attention"]),
        candidates=tuple(float(c) for c in header["candidates"]),
        bucket_edges=tuple(float(e) for e in header["bucket_edges"]),
        info=dict(header["info"]),
        **{name: tensors[name] for name in MEASURED},
    )
    return Profile(measurements, Selection(**header["selection"]), **{name: tensors[name] for name in CHOSEN})


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile file; everything is checked before the ``Profile`` exists.

    Raises:
        FileNotFoundError: no file at ``path``.
        ProfileError: not a safetensors file, truncated or corrupted (checksum), not a profile, another schema
            version, a malformed header, or a tensor missing, unexpected or of the wrong dtype / shape / values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"profile {str(path)!r} does not exist")
    metadata, tensors = _read(path)
    where = f"profile {str(path)!r}"
    if metadata.get("format") != FORMAT:
        raise ProfileError(f"{where} is not a sagesla profile (format {metadata.get('format')!r}, want {FORMAT!r})")
    if metadata.get("schema_version") != str(SCHEMA_VERSION):
        raise ProfileError(
            f"{where} has schema version {metadata.get('schema_version')!r}; this sagesla reads version "
            f"{SCHEMA_VERSION} (recalibrate, or use the sagesla that wrote it)"
        )
    missing, unexpected = sorted(TENSORS.keys() - tensors.keys()), sorted(tensors.keys() - TENSORS.keys())
    if missing or unexpected:
        raise ProfileError(f"{where}: missing tensors {missing}, unexpected tensors {unexpected}")
    if metadata.get("sha256") != _digest(tensors):
        raise ProfileError(f"{where} is corrupted: its tensors do not match the checksum in its header")
    try:
        return _build(json.loads(metadata["profile"]), tensors)
    except ProfileError as error:
        raise ProfileError(f"{where}: {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise ProfileError(f"{where} has a malformed header: {type(error).__name__}: {error}") from None
