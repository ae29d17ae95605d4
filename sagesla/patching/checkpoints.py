"""SLA weights (each SLA layer's ``proj_l``) in and out of a patched model, in our key scheme or TurboDiffusion's.

Keys: ours are the model's own state-dict names, ``blocks.{i}.attn1.sla.proj_l.weight`` [D, D] and
``blocks.{i}.attn1.sla.proj_l.bias`` [D] for a Wan model. These name the same tensors of block i, each with an
optional ``net.`` (TurboDiffusion's training checkpoints) or ``model.diffusion_model.`` prefix:
``blocks.{i}.self_attn.attn_op.local_attn.proj_l.*`` (TurboDiffusion's own), and
``blocks.{i}.attn1.attn_op.local_attn.proj_l.*`` and ``blocks.{i}.attn1.attn_impl.proj_l.*`` (public diffusers
conversions of its checkpoints).

``.pt`` / ``.pth`` / ``.bin`` files are read memory-mapped (a 14B checkpoint is never read whole for its few
``proj_l`` tensors) and without unpickling code.
"""

import hashlib
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from sagesla import validation
from sagesla.files import save_file_atomic
from sagesla.modules import SageSparseLinearAttention, SparseLinearAttention

# The attribute of a patched layer holding its SLA module (so its keys read ``...attn1.sla.proj_l.weight``).
SLA_ATTRIBUTE = "sla"
# The metadata ``save_sla_weights`` writes into its safetensors files, plus the SHA-256 of the tensors under
# ``CHECKSUM_KEY`` (checked on load: safetensors itself does not notice a corrupted data byte).
METADATA = {"format": "sagesla.sla_weights", "schema_version": "1"}
CHECKSUM_KEY = "sha256"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")

_PROJ_L_KEY = re.compile(r"(^|\.)proj_l\.(weight|bias)$")
_TURBO_KEY = re.compile(
    r"^(?:net\.|model\.diffusion_model\.)?blocks\.(\d+)\."
    r"(?:self_attn\.attn_op\.local_attn|attn1\.attn_op\.local_attn|attn1\.attn_impl)\.proj_l\.(weight|bias)$"
)


@dataclass(frozen=True)
class LoadReport:
    """What ``load_sla_weights`` did.

    Attributes:
        source: where the weights came from.
        loaded: the model's keys that received a tensor.
        missing: the model's SLA keys the checkpoint lacks (left as they were).
        unexpected: the checkpoint's ``proj_l`` keys that match no SLA layer of the model (not loaded).
        ignored: how many other keys (not ``proj_l``: the rest of a full model checkpoint) were skipped.
    """

    source: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    ignored: int

    def __str__(self) -> str:
        return (
            f"load_sla_weights: {len(self.loaded)} tensor(s) from {self.source}; missing {self.missing}, "
            f"unexpected {self.unexpected}, {self.ignored} other key(s) ignored"
        )


def sla_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """State-dict key -> parameter for the ``proj_l`` of every SLA module inside ``model``."""
    return {
        f"{name}.{key}": parameter
        for name, module in model.named_modules()
        if isinstance(module, (SparseLinearAttention, SageSparseLinearAttention))
        for key, parameter in module.proj_l.named_parameters(prefix="proj_l")
    }


def model_key(key: str) -> str:
    """A checkpoint key in our scheme (TurboDiffusion's and the community conversions' keys translated)."""
    turbo = _TURBO_KEY.match(key)
    return f"blocks.{turbo[1]}.attn1.{SLA_ATTRIBUTE}.proj_l.{turbo[2]}" if turbo else key


def _select(state: Mapping) -> tuple[dict[str, object], int]:
    """(the ``proj_l`` entries, how many other entries) of a state dict."""
    chosen = {key: value for key, value in state.items() if isinstance(key, str) and _PROJ_L_KEY.search(key)}
    return chosen, len(state) - len(chosen)


def _checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors serialized alone (safetensors' byte layout is deterministic). The metadata is not
    covered: ``load_sla_weights`` reads nothing from it but the format and this checksum."""
    return hashlib.sha256(save(dict(tensors))).hexdigest()


def read_torch_file(path: Path, what: str = "SLA checkpoint") -> object:
    """The object a ``torch.save`` file holds, its tensors memory-mapped (the pages a caller touches are read, not the
    whole file); the legacy non-zip format, which cannot be mapped, is read whole. Never unpickles code.

    Raises:
        ValueError: naming ``what`` and the file, which is truncated, corrupted or holds objects other than tensors
            and containers.
    """
    try:
        # weights_only: a checkpoint is data, never code to unpickle.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:
        raise ValueError(
            f"{what} {str(path)!r} cannot be loaded with torch.load(weights_only=True): it is truncated or "
            f"corrupted, or holds objects other than tensors and containers (never unpickled): {error}"
        ) from error


def _read_safetensors(file: Path) -> tuple[dict[str, object], int]:
    """(``proj_l`` tensors, count of other keys) of one safetensors file; its checksum checked when it has one."""
    chosen, ignored = {}, 0
    try:
        # Reads only the proj_l tensors, not the whole (possibly 14B-parameter) checkpoint.
        with safe_open(file, framework="pt") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                if _PROJ_L_KEY.search(key):
                    chosen[key] = handle.get_tensor(key)
                else:
                    ignored += 1
    except SafetensorError as error:
        raise ValueError(
            f"SLA checkpoint {str(file)!r} is not a readable safetensors file (truncated or corrupted): {error}"
        ) from error
    expected = metadata.get(CHECKSUM_KEY) if metadata.get("format") == METADATA["format"] else None
    # save_sla_weights files hold only proj_l tensors, so the checksum covers exactly what was read.
    if expected is not None and _checksum(chosen) != expected:
        raise ValueError(f"SLA checkpoint {str(file)!r} is corrupted: its tensors do not match their saved SHA-256")
    return chosen, ignored


def _read(source: object) -> tuple[dict[str, object], int, str, dict[str, str]]:
    """(``proj_l`` entries, count of other keys, description, {key: the file it came from}) of a state dict, file or
    directory. A key in two files of a directory raises ValueError naming both."""
    if isinstance(source, Mapping):
        chosen, ignored = _select(source)
        return chosen, ignored, "a state dict", dict.fromkeys(chosen, "a state dict")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"`path_or_state_dict` must be a path or a state dict, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"`path_or_state_dict` {str(path)!r} does not exist")
    if path.suffix in TORCH_SUFFIXES:
        state = read_torch_file(path)
        # TurboDiffusion's training checkpoints nest the weights under "state_dict".
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise TypeError(f"`path_or_state_dict` {str(path)!r} must hold a state dict, got {type(state).__name__}")
        chosen, ignored = _select(state)
        return chosen, ignored, repr(str(path)), dict.fromkeys(chosen, repr(str(path)))
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"`path_or_state_dict` folder {str(path)!r} holds no .safetensors file")
    elif path.suffix == ".safetensors":
        files = [path]
    else:
        raise ValueError(
            "`path_or_state_dict` must be a .safetensors, .pt, .pth or .bin file, a folder of .safetensors files "
            f"(as save_pretrained writes) or a state dict, got {str(path)!r}"
        )
    chosen, ignored, origins = {}, 0, {}
    for file in files:
        tensors, others = _read_safetensors(file)
        for key, tensor in tensors.items():
            if key in chosen:
                raise ValueError(
                    f"SLA checkpoint folder {str(path)!r} holds the key {key!r} twice: in {origins[key]} and in "
                    f"{str(file)!r} (which one to load is ambiguous: remove one of them)"
                )
            chosen[key], origins[key] = tensor, repr(str(file))
        ignored += others
    return chosen, ignored, repr(str(path)), origins


def load_sla_weights(
    model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], strict: bool = True
) -> LoadReport:
    """Load the ``proj_l`` of every SLA layer of a patched model, in place; all or nothing.

    Only keys ending in ``proj_l.weight`` / ``proj_l.bias`` are read, so a full model checkpoint works: a
    ``save_pretrained`` folder or its ``diffusion_pytorch_model.safetensors``, a TurboDiffusion ``.pth``, a folder
    ``convert_turbodiffusion`` wrote (its shards and ``sla_weights.safetensors``), a public diffusers conversion of
    a TurboDiffusion checkpoint, or a ``save_sla_weights`` file. Everything is checked before anything is copied.

    Args:
        model: a model patched by ``sagesla.patch`` (for a pipeline, each transformer on its own).
        path_or_state_dict: a ``.safetensors`` file, a folder of them, a ``.pt`` / ``.pth`` / ``.bin`` file
            (memory-mapped, loaded with ``weights_only=True``; a TurboDiffusion training checkpoint's
            ``"state_dict"`` is looked into), or a {key: tensor} mapping. Keys ours,
            ``blocks.{i}.self_attn.attn_op.local_attn.proj_l.*`` (TurboDiffusion's),
            ``blocks.{i}.attn1.attn_op.local_attn.proj_l.*`` or ``blocks.{i}.attn1.attn_impl.proj_l.*`` (public
            conversions), the last three with an optional ``net.`` or ``model.diffusion_model.`` prefix.
        strict: raise if a model SLA key is missing from the checkpoint or a checkpoint ``proj_l`` key matches no
            SLA layer. Not strict, those are reported and the matching keys load.
    Returns:
        a ``LoadReport`` (loaded, missing and unexpected keys).
    Raises:
        TypeError: a wrong kind of argument, or a ``proj_l`` entry that is not a floating tensor.
        ValueError: no SLA layer in ``model``; a file that cannot be read (truncated, corrupted, a checksum
            mismatch, or a ``.pt`` holding objects other than tensors); one key in two files of a folder (the
            message names both); a shape mismatch or NaN/Inf; two checkpoint keys for one model key; no key
            matched; with ``strict``, missing or unexpected keys (the message lists them). Every message names
            the file (in a folder, the file of each key at fault).
        FileNotFoundError: the path does not exist.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be a torch.nn.Module (for a pipeline, pass each transformer), got {type(model).__name__}"
        )
    validation.check_bool("strict", strict)
    parameters = sla_parameters(model)
    if not parameters:
        raise ValueError("`model` holds no SLA layer: call sagesla.patch(model, ...) before loading SLA weights")
    found, ignored, source, origins = _read(path_or_state_dict)

    def entry(key: str) -> str:
        """A checkpoint key, with its file when the checkpoint is a folder of several."""
        return repr(key) if origins[key] == source else f"{key!r} (in {origins[key]})"

    chosen: dict[str, str] = {}
    unexpected, doubles, problems = [], [], []
    for key, tensor in found.items():
        target = model_key(key)
        if target not in parameters:
            unexpected.append(key)
        elif target in chosen:
            doubles.append(f"{entry(chosen[target])} and {entry(key)} -> {target!r}")
        elif not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(
                f"SLA checkpoint {source}: entry {entry(key)} must be a floating torch.Tensor, got {tensor!r:.60}"
            )
        elif tensor.shape != parameters[target].shape:
            problems.append(
                f"{entry(key)} has shape {tuple(tensor.shape)}, {target!r} {tuple(parameters[target].shape)}"
            )
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(f"{entry(key)} holds NaN/Inf")
        else:
            chosen[target] = key
    missing = [key for key in parameters if key not in chosen]
    if doubles:
        raise ValueError(f"SLA checkpoint {source} names one weight twice: {'; '.join(doubles)}")
    if problems:
        raise ValueError(f"SLA checkpoint {source} does not fit the model: {'; '.join(problems)}")
    if not chosen or (strict and (missing or unexpected)):
        raise ValueError(
            f"SLA checkpoint {source} does not match the model's SLA layers: missing keys {missing}, "
            f"unexpected keys {unexpected}" + ("" if strict else " (strict=False still needs one match)")
        )
    with torch.no_grad():
        for target, key in chosen.items():
            parameters[target].copy_(found[key])
    loaded = [key for key in parameters if key in chosen]
    return LoadReport(source=source, loaded=loaded, missing=missing, unexpected=unexpected, ignored=ignored)


def save_sla_weights(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> list[str]:
    """Write every SLA layer's ``proj_l`` of ``model`` to a safetensors file, atomically; returns the keys.

    The keys are the model's state-dict names (``blocks.{i}.attn1.sla.proj_l.weight`` ...), written by
    ``save_sla_state_dict``.

    Args:
        model: a model patched by ``sagesla.patch``.
        path: the file to write (replaced if it exists).
        metadata: more {str: str} entries for the file's header, e.g. training settings; not the keys
            ``METADATA`` and ``CHECKSUM_KEY`` name.
    Raises:
        ValueError: ``model`` holds no SLA layer, or ``metadata`` names a key this function writes.
        TypeError: ``metadata`` is not a mapping of str to str.
    """
    _check_metadata(metadata)
    parameters = sla_parameters(model)
    if not parameters:
        raise ValueError("`model` holds no SLA layer: call sagesla.patch(model, ...) first")
    return save_sla_state_dict({key: parameter.detach() for key, parameter in parameters.items()}, path, metadata)


def save_sla_state_dict(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> list[str]:
    """Write {key: ``proj_l`` tensor} to a safetensors file in ``save_sla_weights``' format, atomically; returns
    the keys.

    The file holds the tensors (moved to the CPU, contiguous) under their keys, the metadata ``METADATA``, the
    tensors' SHA-256 under ``CHECKSUM_KEY`` (checked on load) and ``metadata``, written by ``save_file_atomic``.

    Args:
        tensors: {state-dict key: tensor}, keys as ``load_sla_weights`` reads them (ending in ``proj_l.weight`` /
            ``proj_l.bias``).
        path: the file to write (replaced if it exists).
        metadata: more {str: str} entries for the file's header; not the keys ``METADATA`` and ``CHECKSUM_KEY``
            name.
    Raises:
        ValueError: no tensor, a key ``load_sla_weights`` would not read, or ``metadata`` names a key this function
            writes.
        TypeError: ``tensors`` is not a mapping of str to torch.Tensor, or ``metadata`` not one of str to str.
    """
    _check_metadata(metadata)
    if not isinstance(tensors, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in tensors.items()
    ):
        raise TypeError(f"`tensors` must be a mapping of str to torch.Tensor, got {tensors!r:.80}")
    if not tensors:
        raise ValueError("`tensors` must hold at least one proj_l tensor, got an empty mapping")
    stray = [key for key in tensors if not _PROJ_L_KEY.search(key)]
    if stray:
        raise ValueError(
            f"`tensors` keys must end in proj_l.weight or proj_l.bias (load_sla_weights reads no other), "
            f"got {stray[:3]}"
        )
    saved = {key: tensor.to("cpu").contiguous() for key, tensor in tensors.items()}
    save_file_atomic(saved, path, dict(metadata or {}) | METADATA | {CHECKSUM_KEY: _checksum(saved)})
    return list(saved)


def _check_metadata(metadata: object) -> None:
    """Raise unless ``metadata`` is None or a mapping of str to str naming none of the keys the writers set."""
    extra = {} if metadata is None else metadata
    if not isinstance(extra, Mapping) or not all(isinstance(x, str) for item in extra.items() for x in item):
        raise TypeError(f"`metadata` must be a mapping of str to str, got {metadata!r:.80}")
    reserved = sorted(extra.keys() & {*METADATA, CHECKSUM_KEY})
    if reserved:
        raise ValueError(f"`metadata` must not set {reserved}: save_sla_weights writes them, got {dict(extra)!r:.80}")
