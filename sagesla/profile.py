"""Calibration profiles: the per-layer topk ``sagesla.calibration`` chose, with what it measured, in one file.

Shape letters: NL self-attention layers (model order), NB timestep buckets, NC candidate topk values (ascending),
H heads per layer. Errors compare SLA's attention output with dense attention's, per call, in the layer's
(B, S, H, D) space: rel-L1 ``sum|o - ref| / sum|ref|`` and cosine similarity, each over a whole batch row of one
call ("layer") or over one head of it ("head"); an observation is one batch row of one attention call.

File: safetensors, tensors on CPU (see ``TENSORS``), and a header whose metadata holds ``format``
("sagesla.profile"), ``schema_version``, ``profile`` (JSON: model class, layer fingerprint, SLA settings,
candidates, bucket edges, selection rule, environment) and ``sha256``, one digest of all the rest (``_digest``: the
format, the schema version, the JSON header and every tensor's name, dtype, shape and bytes). ``load_profile``
checks all of it and builds the ``Profile`` only when everything is right: a bad file raises ``ProfileError``
naming the file and the field, never half-loads. Every field is checked, with its type, in the dataclasses'
``__post_init__``, so a ``Profile`` built in code passes the same checks as one read from a file.
"""

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from sagesla import validation
from sagesla.files import save_file_atomic
from sagesla.settings import SLASettings

FORMAT = "sagesla.profile"
# A version-1 file's checksum covers the tensors only, so nothing vouches for its header: it is refused
# (recalibrate).
SCHEMA_VERSION = 2
METRICS = ("rel_l1", "cosine")
# The file's metadata keys, and the JSON header's fields (``Profile._header``), all required and nothing else.
METADATA_KEYS = ("format", "schema_version", "profile", "sha256")
HEADER_FIELDS = ("model_class", "layers", "attention", "candidates", "bucket_edges", "selection", "info")
# ``selection`` fields newer than the format: written only when set, so a file without them (older, or of another
# selection rule) reads as before with None, and older readers still read budget-mode files.
SELECTION_OPTIONAL = ("target_psnr", "output_psnr", "judged_on")
# What an output PSNR compares: the final latents (each dense row's max - min as the range) or the decoded videos
# (values in [-1, 1], range 2).
JUDGED_ON = ("latents", "videos")
# Bounds of the header's numbers: far above any model or kernel configuration, low enough to stop a typo.
MAX_BLOCK_SIZE = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
# ``info`` nests lists / objects at most this deep, its own level included. The parser refuses anything deeper than
# MAX_HEADER_DEPTH before the digest is taken: the header's level, info's, and one more so info's check names it.
MAX_INFO_DEPTH = 4
MAX_HEADER_DEPTH = MAX_INFO_DEPTH + 2

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


def _got(value: object) -> str:
    return f"{type(value).__name__} {value!r:.80}"


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not validation.is_number(value, int) or not low <= value <= high:
        raise ProfileError(f"`{name}` must be an int in [{low}, {high}], got {_got(value)}")


def _check_float(name: str, value: object, accepted: str, within: Callable[[float], bool]) -> None:
    """``value`` must be a finite float (not an int, not a bool) for which ``within`` holds (``accepted`` says so)."""
    if not validation.is_number(value, float) or not math.isfinite(value) or not within(value):
        raise ProfileError(f"`{name}` must be a finite float {accepted}, got {_got(value)}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ProfileError(f"`{name}` must be a bool, got {_got(value)}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ProfileError(f"`{name}` must be one of {choices}, got {_got(value)}")


def _check_ascending(name: str, values: object, accepted: str, within: Callable[[float], bool]) -> None:
    """A tuple of strictly ascending finite floats, each ``accepted``."""
    if not isinstance(values, tuple):
        raise ProfileError(f"`{name}` must be a tuple of floats, got {_got(values)}")
    for i, value in enumerate(values):
        _check_float(f"{name}[{i}]", value, accepted, within)
    if list(values) != sorted(set(values)):
        raise ProfileError(f"`{name}` must be strictly ascending, got {list(values)}")


def _check_json(name: str, value: object, depth: int) -> None:
    """JSON data (str keys, finite numbers) with lists / dicts at most ``depth`` levels deep, ``value``'s included."""
    if isinstance(value, (list, tuple, dict)) and depth < 1:
        raise ProfileError(f"`{name}` nests deeper than {MAX_INFO_DEPTH} levels from `info`, got {_got(value)}")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProfileError(f"`{name}` keys must be str, got {_got(key)}")
            _check_json(f"{name}.{key}", item, depth - 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(f"{name}[{i}]", item, depth - 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ProfileError(f"`{name}` must be finite, got {value!r}")
    elif value is not None and not isinstance(value, (str, int, float)):
        raise ProfileError(f"`{name}` must be JSON data (str, int, float, bool, None, list, dict), got {_got(value)}")


# The SLA settings a profile records, resolved for the device the candidates ran on. ``sagesla.patch`` must use the
# same quantization, blocks, linear scope and feature map (CHECKED_SETTINGS): they change what a topk computes;
# ``backend`` and ``pv_precision`` are recorded for the reader.
RECORDED_SETTINGS = ("quantized", "block_q", "block_k", "linear_scope", "feature_map", "backend", "pv_precision")


def _check_settings(values: Mapping[str, object]) -> None:
    """The recorded settings, by the names the header gives them (``attention.<field>``)."""
    _check_bool("attention.quantized", values["quantized"])
    _check_int("attention.block_q", values["block_q"], 1, MAX_BLOCK_SIZE)
    _check_int("attention.block_k", values["block_k"], 1, MAX_BLOCK_SIZE)
    _check_choice("attention.linear_scope", values["linear_scope"], validation.LINEAR_SCOPES)
    _check_choice("attention.feature_map", values["feature_map"], validation.FEATURE_MAPS)
    _check_choice("attention.backend", values["backend"], validation.BACKENDS)
    _check_choice("attention.pv_precision", values["pv_precision"], validation.PV_PRECISIONS)


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


def _check_layers(layers: object) -> None:
    if not isinstance(layers, tuple) or not layers:
        raise ProfileError(f"`layers` must be a non-empty tuple of LayerSpec, got {_got(layers)}")
    for i, layer in enumerate(layers):
        if not isinstance(layer, LayerSpec):
            raise ProfileError(f"`layers[{i}]` must be a LayerSpec(name, heads, head_dim), got {_got(layer)}")
        if not isinstance(layer.name, str) or not layer.name:
            raise ProfileError(f"`layers[{i}].name` must be a non-empty str, got {_got(layer.name)}")
        _check_int(f"layers[{i}].heads", layer.heads, 1, MAX_HEADS)
        _check_int(f"layers[{i}].head_dim", layer.head_dim, 1, MAX_HEAD_DIM)
    if len({layer.heads for layer in layers}) != 1:
        raise ProfileError(f"`layers` must all have one head count, got {list(layers)}")
    if len({layer.name for layer in layers}) != len(layers):
        raise ProfileError(f"`layers` names must be unique, got {[layer.name for layer in layers]}")


@dataclass(frozen=True, eq=False)
class Measurements:
    """What a calibration run measured for every layer, timestep bucket, candidate topk and head.

    Attributes:
        model_class: class name of the calibrated model (or pipeline).
        layers: the fingerprint, one ``LayerSpec`` per self-attention layer (NL); every layer has H heads.
        attention: the SLA settings of the candidates (``RECORDED_SETTINGS`` resolved for their device).
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
    attention: SLASettings
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
        if not isinstance(self.model_class, str) or not self.model_class.isidentifier():
            raise ProfileError(
                f"`model_class` must be a class name (a Python identifier), got {_got(self.model_class)}"
            )
        _check_layers(self.layers)
        if not isinstance(self.attention, SLASettings):
            raise ProfileError(f"`attention` must be an SLASettings, got {_got(self.attention)}")
        recorded = {name: getattr(self.attention, name) for name in RECORDED_SETTINGS}
        _check_settings(recorded)
        # Only what a profile records: a round trip through a file gives an equal object.
        object.__setattr__(self, "attention", SLASettings(**recorded))
        _check_ascending("candidates", self.candidates, "in (0, 1]", lambda c: 0 < c <= 1)
        if not self.candidates:
            raise ProfileError("`candidates` must not be empty")
        _check_ascending("bucket_edges", self.bucket_edges, ">= 0 (a timestep)", lambda e: e >= 0)
        if not isinstance(self.info, dict):
            raise ProfileError(f"`info` must be a dict, got {_got(self.info)}")
        _check_json("info", self.info, MAX_INFO_DEPTH)
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
        target_psnr: the output PSNR (dB) asked for, when topk was allocated for it
            (``sagesla.calibration.choose_at_quality``: ``budget`` is then the largest worst error at the chosen
            topk); else None.
        output_psnr: the output PSNR (dB) measured with the chosen topk, given with ``target_psnr``; else None.
        judged_on: what ``output_psnr`` compared with the dense model's (``JUDGED_ON``): "latents" (the default with
            ``target_psnr``, and what a file without the field measured) or "videos"; None without ``target_psnr``.
    """

    metric: str
    budget: float
    per_head: bool = False
    target_sparsity: float | None = None
    target_psnr: float | None = None
    output_psnr: float | None = None
    judged_on: str | None = None

    def __post_init__(self) -> None:
        _check_choice("selection.metric", self.metric, METRICS)
        _check_float("selection.budget", self.budget, ">= 0", lambda budget: budget >= 0)
        _check_bool("selection.per_head", self.per_head)
        if self.target_sparsity is not None:
            _check_float("selection.target_sparsity", self.target_sparsity, "in [0, 1) or None", lambda t: 0 <= t < 1)
        if self.target_psnr is not None:
            _check_float("selection.target_psnr", self.target_psnr, "> 0 (dB) or None", lambda t: t > 0)
        if self.output_psnr is not None:
            _check_float("selection.output_psnr", self.output_psnr, "(dB) or None", lambda _: True)
        if (self.target_psnr is None) != (self.output_psnr is None):
            raise ProfileError(
                "`selection.target_psnr` and `selection.output_psnr` must be given together (or neither), got "
                f"{self.target_psnr!r} and {self.output_psnr!r}"
            )
        if self.target_psnr is None and self.judged_on is not None:
            raise ProfileError(
                f"`selection.judged_on` comes with `selection.target_psnr`, got {self.judged_on!r} alone"
            )
        if self.target_psnr is not None:
            if self.judged_on is None:
                object.__setattr__(self, "judged_on", JUDGED_ON[0])
            _check_choice("selection.judged_on", self.judged_on, JUDGED_ON)
        if self.target_psnr is not None and (self.target_sparsity is not None or self.per_head):
            raise ProfileError(
                "`selection.target_psnr` allocates per layer and excludes `selection.target_sparsity` and "
                f"`selection.per_head`, got target_sparsity {self.target_sparsity!r}, per_head {self.per_head!r}"
            )


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
        if not isinstance(self.measurements, Measurements):
            raise ProfileError(f"`measurements` must be a Measurements, got {_got(self.measurements)}")
        if not isinstance(self.selection, Selection):
            raise ProfileError(f"`selection` must be a Selection, got {_got(self.selection)}")
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

    def dense_layers(self) -> list[str]:
        """The layers whose ``topk`` is 1.0 in every timestep bucket, in model order.

        Keeping every key block, SLA is slower than dense attention and (quantized) less exact, so
        ``sagesla.patch`` leaves these layers to diffusers' own attention. A layer at 1.0 in some buckets only is
        not among them (it is patched and runs diffusers' attention in those buckets).
        """
        every = (self.topk == 1.0).all(dim=1).tolist()
        return [layer.name for layer, dense in zip(self.layers, every, strict=True) if dense]

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

        tensors = self._tensors()
        header = json.dumps(self._header(), allow_nan=False)
        metadata = {
            "format": FORMAT,
            "schema_version": str(SCHEMA_VERSION),
            "profile": header,
            # Of the header as a reader parses it, so writer and reader digest the same values.
            "sha256": _digest(json.loads(header), tensors),
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
            "attention": {name: getattr(m.attention, name) for name in RECORDED_SETTINGS},
            "candidates": list(m.candidates),
            "bucket_edges": list(m.bucket_edges),
            "selection": {
                name: value
                for name, value in asdict(self.selection).items()
                if name not in SELECTION_OPTIONAL or value is not None
            },
            "info": m.info,
        }


def _digest(header: object, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of everything a profile file says, in one canonical byte string.

    The bytes: an 8-byte little-endian length, then the canonical JSON (sorted keys, no spaces, ASCII) of
    ``{"format", "schema_version", "profile": header, "tensors": [[name, dtype, shape], ...]}``, then each tensor's
    bytes (C order, little-endian), tensors in name order. Whitespace and key order of the stored header do not
    change the digest; any value, type, field or tensor byte does.
    """
    ordered = sorted(tensors.items())
    document = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "profile": header,
        "tensors": [[name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)] for name, tensor in ordered],
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    digest = hashlib.sha256(len(text).to_bytes(8, "little") + text)
    for _, tensor in ordered:
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.hexdigest()


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as error:
        raise ProfileError(f"not a readable safetensors file (truncated? corrupted?): {error}") from error
    return metadata, tensors


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ProfileError(f"the header names the key {key!r} twice in one object")
        seen.add(key)
    return dict(pairs)


def _no_constant(name: str) -> float:
    raise ProfileError(f"the header holds {name}: every number must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProfileError(f"the header holds the number {text}, which overflows a float: every number must be finite")
    return value


def _check_depth(name: str, value: object, depth: int) -> None:
    """No list or object deeper than ``depth`` levels inside ``value`` (``name`` its path, "" for the header)."""
    if not isinstance(value, (dict, list)):
        return
    if depth <= 0:
        raise ProfileError(f"`{name}` nests deeper than {MAX_HEADER_DEPTH} levels: the header has no such field")
    for key, item in value.items() if isinstance(value, dict) else enumerate(value):
        path = (f"{name}.{key}" if name else key) if isinstance(value, dict) else f"{name}[{key}]"
        _check_depth(path, item, depth - 1)


def _parse(text: str) -> object:
    """The JSON header, strictly: no NaN / Infinity, no key twice in one object, at most ``MAX_HEADER_DEPTH`` deep."""
    try:
        header = json.loads(
            text, object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_float=_finite_float
        )
    except ProfileError:
        raise
    except RecursionError:
        raise ProfileError(f"the header nests deeper than {MAX_HEADER_DEPTH} levels: it has no such field") from None
    except ValueError as error:
        raise ProfileError(f"the header `profile` is not valid JSON: {error}") from None
    _check_depth("", header, MAX_HEADER_DEPTH)
    return header


def _fields(name: str, value: object, expected: Sequence[str], optional: Sequence[str] = ()) -> dict:
    """``value``, a JSON object with exactly the fields ``expected`` and any of the ``optional`` ones, which are
    never null (left out, they read as None: one spelling of each value)."""
    if not isinstance(value, dict):
        raise ProfileError(f"`{name}` must be an object with the fields {list(expected)}, got {_got(value)}")
    allowed = [*expected, *optional]
    missing, unexpected = [key for key in expected if key not in value], sorted(value.keys() - set(allowed))
    if missing or unexpected:
        also = f" (optional: {list(optional)})" if optional else ""
        raise ProfileError(
            f"`{name}` must have the fields {list(expected)}{also}: missing {missing}, unexpected {unexpected}"
        )
    for key in optional:
        if key in value and value[key] is None:
            raise ProfileError(f"`{name}.{key}` must be left out when it is null, got null")
    return value


def _array(name: str, value: object) -> tuple:
    if not isinstance(value, list):
        raise ProfileError(f"`{name}` must be a JSON array, got {_got(value)}")
    return tuple(value)


def _build(header: object, tensors: dict[str, torch.Tensor]) -> Profile:
    """The ``Profile`` of a parsed header and its tensors; every field is checked, nothing converted."""
    header = _fields("header", header, HEADER_FIELDS)
    layers = []
    for i, entry in enumerate(_array("layers", header["layers"])):
        if not isinstance(entry, list) or len(entry) != len(LayerSpec._fields):
            raise ProfileError(f"`layers[{i}]` must be an array [name, heads, head_dim], got {_got(entry)}")
        layers.append(LayerSpec(*entry))
    attention = _fields("attention", header["attention"], RECORDED_SETTINGS)
    _check_settings(attention)
    required = [item.name for item in fields(Selection) if item.name not in SELECTION_OPTIONAL]
    selection = _fields("selection", header["selection"], required, SELECTION_OPTIONAL)
    measurements = Measurements(
        model_class=header["model_class"],
        layers=tuple(layers),
        attention=SLASettings(**attention),
        candidates=_array("candidates", header["candidates"]),
        bucket_edges=_array("bucket_edges", header["bucket_edges"]),
        info=header["info"],
        **{name: tensors[name] for name in MEASURED},
    )
    return Profile(measurements, Selection(**selection), **{name: tensors[name] for name in CHOSEN})


def _check_metadata(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> object:
    """The parsed JSON header, once format, version, keys, tensor names and the digest are right."""
    if metadata.get("format") != FORMAT:
        raise ProfileError(f"not a sagesla profile (format {metadata.get('format')!r}, want {FORMAT!r})")
    version = metadata.get("schema_version")
    if version == "1":
        raise ProfileError(
            f"schema version '1', whose checksum covers the tensors only and cannot vouch for the header; this "
            f"sagesla reads version {SCHEMA_VERSION}: recalibrate (sagesla calibrate ... --out) to write it"
        )
    if version != str(SCHEMA_VERSION):
        raise ProfileError(
            f"schema version {version!r}; this sagesla reads version {SCHEMA_VERSION} (recalibrate, or use the "
            "sagesla that wrote it)"
        )
    missing = [key for key in METADATA_KEYS if key not in metadata]
    unexpected = sorted(metadata.keys() - set(METADATA_KEYS))
    if missing or unexpected:
        raise ProfileError(
            f"metadata must hold the keys {list(METADATA_KEYS)}: missing {missing}, unexpected {unexpected}"
        )
    header = _parse(metadata["profile"])
    missing, unexpected = sorted(TENSORS.keys() - tensors.keys()), sorted(tensors.keys() - TENSORS.keys())
    if missing or unexpected:
        raise ProfileError(f"missing tensors {missing}, unexpected tensors {unexpected}")
    if metadata["sha256"] != _digest(header, tensors):
        raise ProfileError(
            "corrupted or edited: its header and tensors do not match the SHA-256 in its metadata "
            "(recalibrate; a profile is never edited by hand)"
        )
    return header


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile file; everything is checked before the ``Profile`` exists.

    The SHA-256 in the metadata covers the format, the schema version, the whole JSON header and every tensor
    (``_digest``), so a changed value anywhere is refused; then every header field is checked (type, range,
    structure) by the dataclasses that hold it.

    Raises:
        FileNotFoundError: no file at ``path``.
        ProfileError: (naming the file, and the field where one is at fault) not a safetensors file, truncated,
            not a profile, another schema version (version 1 included: its checksum does not cover the header), a
            metadata key missing or unexpected, a checksum mismatch (corrupted, or edited by hand), a header that is
            not strict JSON (NaN, Infinity, a key twice) or nests too deeply, a header field missing, unexpected,
            of the wrong type or out of range, or a tensor missing, unexpected or of the wrong dtype / shape /
            values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"profile {str(path)!r} does not exist")
    try:
        metadata, tensors = _read(path)
        return _build(_check_metadata(metadata, tensors), tensors)
    except ProfileError as error:
        raise ProfileError(f"profile {str(path)!r}: {error}") from None
