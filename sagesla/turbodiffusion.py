"""TurboDiffusion's SLA-trained Wan checkpoints (thu-ml/TurboDiffusion) as diffusers ``WanTransformer3DModel`` folders.

TurboDiffusion releases ``torch.save`` state dicts of its ``WanModel`` with SLA in place (``TurboWan2.1-T2V-1.3B-480P
.pth``, ``TurboWan2.1-T2V-14B-{480P,720P}.pth``, ``TurboWan2.2-I2V-A14B-{high,low}-720P.pth``, each also as
``-quant.pth``): original Wan key names, which diffusers' ``convert_wan_transformer_to_diffusers`` renames, except

- ``patch_embedding.weight`` is a Linear's [D, C * 1 * 2 * 2] over patches flattened in (c, kt, kh, kw) order, i.e.
  diffusers' Conv3d weight [D, C, 1, 2, 2] reshaped;
- each self-attention's SLA weights ``blocks.{i}.self_attn.attn_op.local_attn.proj_l.{weight [hd, hd], bias [hd]}``,
  which go to a separate ``sla_weights.safetensors`` under our keys ``blocks.{i}.attn1.sla.proj_l.*``;
- the ``-quant`` files store every Linear inside ``blocks`` but ``proj_l`` as ``<name>.int8_weight`` [N, K] int8,
  ``<name>.scale`` [ceil(N / 128), ceil(K / 128)] float32 (one per 128 x 128 block) and ``<name>.bias`` [N]:
  dequantized here (``dequantize_blockwise``).

Training checkpoints nest the same under ``"state_dict"`` with a ``net.`` prefix. Shapes: D model dim (heads x hd;
hd = 128 in the released models), C input channels, N x K a Linear's weight.

Importing this module does not import diffusers; converting does.
"""

import contextlib
import inspect
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sagesla import files, validation
from sagesla.patching import checkpoints

# A quantized weight's scale covers one QUANT_BLOCK x QUANT_BLOCK block.
QUANT_BLOCK = 128
SLA_WEIGHTS_FILE = "sla_weights.safetensors"
# diffusers' save_pretrained shards above "10GB" (10**9 bytes a GB).
DEFAULT_SHARD_SIZE = 10 * 10**9
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Released models: dim 1536 -> 12 heads, 5120 -> 40, all of head dim 128.
HEAD_DIM = 128
HEADS_BY_DIM = {1536: 12, 5120: 40}
# Every Wan transformer's values of the config entries its weights' shapes do not show.
WAN_DEFAULTS = {
    "patch_size": (1, 2, 2),
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}

_PREFIXES = ("net.", "model.diffusion_model.")
# TurboDiffusion's proj_l keys: the format (block, "weight" / "bias") and its pattern.
_PROJ_L_KEY = "blocks.{}.self_attn.attn_op.local_attn.proj_l.{}"
_PROJ_L = re.compile(r"^blocks\.(\d+)\.self_attn\.attn_op\.local_attn\.proj_l\.(weight|bias)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class WanKind:
    """A released Wan transformer, told apart by its shapes."""

    name: str
    dim: int
    in_channels: int
    num_layers: int
    ffn_dim: int
    image: bool


WAN_KINDS = (
    WanKind("Wan2.1 T2V 1.3B", 1536, 16, 30, 8960, False),
    WanKind("Wan2.1 T2V 14B", 5120, 16, 40, 13824, False),
    # Both experts (high and low noise) of Wan2.2 I2V A14B: no CLIP image embedding.
    WanKind("Wan2.2 I2V A14B", 5120, 36, 40, 13824, False),
    WanKind("Wan2.1 I2V 14B", 5120, 36, 40, 13824, True),
)


@dataclass(frozen=True)
class WanConfig:
    """A ``WanTransformer3DModel`` config for a checkpoint, and where each entry came from.

    Attributes:
        config: the constructor's keywords.
        kind: the released model the shapes match (``WanKind.name``), or "custom".
        from_shapes: entries the checkpoint's shapes decide.
        from_config: entries taken from the given config (the shapes leave them open).
        from_kind: entries of the released kind or of every Wan (``WAN_DEFAULTS``).
    """

    config: dict
    kind: str
    from_shapes: tuple[str, ...]
    from_config: tuple[str, ...]
    from_kind: tuple[str, ...]


@dataclass(frozen=True)
class _Plan:
    """How to make each diffusers tensor from a checkpoint.

    Attributes:
        state: the checkpoint's {key: tensor} (memory-mapped), keys without prefix.
        recipes: {diffusers key: recipe}, a recipe ("copy", key), ("patch", key, Conv3d shape) (the 2-D patch
            embedding reshaped) or ("dequantize", int8 key, scale key), in checkpoint keys.
        sla: {our proj_l key: checkpoint key}.
        what: the checkpoint, as errors name it.
    """

    state: dict
    recipes: dict
    sla: dict
    what: str


@dataclass(frozen=True)
class ConversionReport:
    """What ``convert_turbodiffusion`` wrote.

    Attributes:
        source: the checkpoint converted.
        out_dir: the diffusers folder written.
        kind: the released model the shapes match, or "custom".
        config: the ``WanTransformer3DModel`` config written (``config.json``).
        from_shapes: config entries the checkpoint's shapes decided.
        from_config: config entries taken from the given config.
        tensors: tensors of the diffusers model written.
        shards: ``diffusion_pytorch_model*.safetensors`` files written (1: not sharded).
        sla_layers: SLA layers whose ``proj_l`` went to ``sla_weights.safetensors`` (0: none, no file).
        dequantized: int8 linear weights dequantized.
        dtype: the floating dtype of the model's tensors (``proj_l`` stay float32).
    """

    source: str
    out_dir: str
    kind: str
    config: dict
    from_shapes: tuple[str, ...]
    from_config: tuple[str, ...]
    tensors: int
    shards: int
    sla_layers: int
    dequantized: int
    dtype: torch.dtype

    def __str__(self) -> str:
        def origin(key: str) -> str:
            return "shapes" if key in self.from_shapes else "config" if key in self.from_config else "default"

        entries = ", ".join(f"{key}={value!r} ({origin(key)})" for key, value in self.config.items())
        sla = f"{self.sla_layers} layers' proj_l in {SLA_WEIGHTS_FILE}" if self.sla_layers else "no proj_l found"
        return (
            f"convert_turbodiffusion: {self.source} -> {self.out_dir}\n"
            f"  model: {self.kind} WanTransformer3DModel, {self.tensors} tensors in {self.shards} file(s), "
            f"{self.dtype}\n"
            f"  SLA: {sla}\n"
            f"  dequantized: {self.dequantized} int8 linear weight(s)\n"
            f"  config: {entries}"
        )


def dequantize_blockwise(int8_weight: torch.Tensor, scale: torch.Tensor, block: int = QUANT_BLOCK) -> torch.Tensor:
    """A Linear weight from TurboDiffusion's blockwise int8 form: ``w[i, j] = int8_weight[i, j] * scale[i // block,
    j // block]``, one float32 multiplication (rounded once) per element.

    Args:
        int8_weight: [N, K] int8.
        scale: [ceil(N / block), ceil(K / block)] floating, one per block x block tile (TurboDiffusion: float32,
            the tile's amax / 128).
        block: the tile side.
    Returns:
        [N, K] float32 on ``int8_weight``'s device.
    Raises:
        TypeError: ``int8_weight`` is not an int8 tensor or ``scale`` not a floating one.
        ValueError: ``int8_weight`` is not 2-D, ``scale``'s shape does not fit it, or ``block`` is not a positive int.
    """
    if not isinstance(int8_weight, torch.Tensor) or int8_weight.dtype != torch.int8:
        raise TypeError(f"`int8_weight` must be an int8 torch.Tensor [N, K], got {_describe(int8_weight)}")
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError(
            f"`scale` must be a floating torch.Tensor [ceil(N / block), ceil(K / block)], got {_describe(scale)}"
        )
    validation.check_positive("block", block)
    if int8_weight.dim() != 2:
        raise ValueError(f"`int8_weight` must have shape [N, K], got {tuple(int8_weight.shape)}")
    rows, cols = int8_weight.shape
    tiles = (-(-rows // block), -(-cols // block))
    if tuple(scale.shape) != tiles:
        raise ValueError(
            f"`scale` must have shape [ceil(N / {block}), ceil(K / {block})] = {list(tiles)} for `int8_weight` "
            f"{list(int8_weight.shape)}, got {list(scale.shape)}"
        )
    weight = int8_weight.to(torch.float32).contiguous()
    padding = (0, tiles[1] * block - cols, 0, tiles[0] * block - rows)
    if any(padding):
        weight = torch.nn.functional.pad(weight, padding)
    # Each block x block tile times its scale: a broadcast over the tile view, no expanded scale matrix.
    tiled = weight.view(tiles[0], block, tiles[1], block)
    tiled.mul_(scale.to(device=weight.device, dtype=torch.float32)[:, None, :, None])
    return weight[:rows, :cols].contiguous()


def read_config(config: str | os.PathLike | Mapping | None) -> dict | None:
    """A diffusers config as a dict: ``config`` itself, or the JSON of a ``config.json`` file or of a folder holding
    one (a pipeline folder's ``transformer/`` too). None stays None.

    Raises:
        TypeError: ``config`` is not a path, a mapping or None.
        FileNotFoundError: no such file, or no config.json in the folder.
        ValueError: the file is not a JSON object, or names another class than ``WanTransformer3DModel``.
    """
    if config is None:
        return None
    if isinstance(config, Mapping):
        entries, where = dict(config), "`config`"
    elif isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_dir():
            path = next((p for p in (path / "config.json", path / "transformer" / "config.json") if p.is_file()), path)
        if not path.is_file():
            raise FileNotFoundError(f"`config` {os.fspath(config)!r}: no such file, nor a folder holding config.json")
        where = f"`config` {str(path)!r}"
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{where} is not readable JSON: {error}") from error
        if not isinstance(entries, dict):
            raise ValueError(f"{where} must hold a JSON object (a diffusers config), got {type(entries).__name__}")
    else:
        raise TypeError(
            f"`config` must be a config.json path, a folder holding one, a dict or None, got {_describe(config)}"
        )
    if entries.get("_class_name", "WanTransformer3DModel") != "WanTransformer3DModel":
        raise ValueError(f"{where} is a {entries['_class_name']} config, want a WanTransformer3DModel one")
    return entries


def infer_wan_config(state: Mapping[str, torch.Tensor], config: Mapping | None = None) -> WanConfig:
    """The ``WanTransformer3DModel`` config of a TurboDiffusion (or original Wan) state dict.

    The shapes decide the model dim (``patch_embedding``), ``in_channels``, ``out_channels`` (``head.head``),
    ``text_dim``, ``freq_dim``, ``ffn_dim``, ``num_layers`` (the block count), ``cross_attn_norm`` (``norm3``),
    ``image_dim`` / ``added_kv_proj_dim`` (``img_emb`` / ``k_img``) and the head dim (``proj_l`` [hd, hd], when
    there). Without ``proj_l`` the head count comes from the released kinds (dim 1536: 12 heads, 5120: 40, of 128)
    or ``config``. The other entries come from ``config``, else ``WAN_DEFAULTS``. Only shapes are read: meta
    tensors do.

    Args:
        state: {key: tensor} in TurboDiffusion's names (a ``net.`` / ``model.diffusion_model.`` prefix and a
            training checkpoint's ``"state_dict"`` nesting are accepted).
        config: ``WanTransformer3DModel`` keywords (a diffusers config dict; ``_``-keys ignored).
    Returns:
        a ``WanConfig``.
    Raises:
        ValueError: a key the config needs is missing or has an unfitting shape; an entry neither the shapes nor
            ``config`` decide (pass ``config``, the CLI's --config); a ``config`` entry the shapes contradict (both
            values named) or one ``WanTransformer3DModel`` does not take.
    """
    return _infer(_normalize(state, "the state dict"), read_config(config), "the state dict")


def convert_turbodiffusion(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: str | os.PathLike | Mapping | None = None,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
) -> ConversionReport:
    """Turn a TurboDiffusion checkpoint into a diffusers ``WanTransformer3DModel`` folder plus its SLA weights.

    ``out_dir`` receives ``config.json``, ``diffusion_pytorch_model.safetensors`` (or shards
    ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` and their ``.index.json``, as ``save_pretrained`` writes
    them) and ``sla_weights.safetensors`` (``save_sla_weights``' format). Then::

        model = WanTransformer3DModel.from_pretrained(out_dir)
        sagesla.patch(model, topk=0.1)
        sagesla.load_sla_weights(model, out_dir)

    The checkpoint is memory-mapped and never unpickled as code; everything is checked against the model (built on
    the meta device) before a byte is written, and at most about one shard of converted tensors is in memory at a
    time. The folder is written beside ``out_dir`` and renamed into place: on any failure nothing appears there.

    Args:
        checkpoint: a TurboDiffusion ``.pth`` / ``.pt`` (``-quant`` too, or a training checkpoint).
        out_dir: the folder to create; it must not exist or be empty.
        config: a diffusers config.json, a folder holding one, or a dict, for what the shapes do not decide (see
            ``infer_wan_config``); None for the released models.
        dtype: the model tensors' dtype: torch.bfloat16, torch.float16 or torch.float32.
        progress: show a progress bar (tqdm) over the tensors.
        max_shard_size: the most bytes of one weights file (diffusers' "10GB" by default).
    Returns:
        a ``ConversionReport``.
    Raises:
        TypeError: an argument of a wrong kind.
        ValueError: a bad ``dtype`` / ``max_shard_size``; a checkpoint that is corrupt, truncated or foreign (the
            file named, and the first bad key: missing, unexpected, of a wrong shape or dtype, an int8 weight
            without its scale, NaN/Inf); config entries undecided or contradicted (see ``infer_wan_config``).
        FileExistsError: ``out_dir`` is a non-empty folder.
        FileNotFoundError: no such checkpoint or config.
    """
    path = _check_checkpoint(checkpoint)
    out = check_out_dir(out_dir)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"`dtype` must be a torch.dtype, one of {tuple(DTYPES.values())}, got {_describe(dtype)}")
    validation.check_choice("dtype", dtype, tuple(DTYPES.values()))
    validation.check_bool("progress", progress)
    validation.check_positive("max_shard_size", max_shard_size)
    given = read_config(config)
    source = repr(str(path))
    what = f"TurboDiffusion checkpoint {source}"
    state = _normalize(checkpoints.read_torch_file(path, "TurboDiffusion checkpoint"), what)
    wan = _infer(state, given, what)
    model = _meta_model(wan.config)
    plan = _plan(state, wan, model, what)
    shards = _shard(model, dtype, max_shard_size)
    with _new_folder(out) as folder:
        _write(folder, model, plan, shards, dtype, progress, path.name)
    return ConversionReport(
        source=str(path),
        out_dir=str(out),
        kind=wan.kind,
        config=wan.config,
        from_shapes=wan.from_shapes,
        from_config=wan.from_config,
        tensors=len(plan.recipes),
        shards=len(shards.filename_to_tensors),
        sla_layers=len(plan.sla) // 2,
        dequantized=sum(recipe[0] == "dequantize" for recipe in plan.recipes.values()),
        dtype=dtype,
    )


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a Path if a folder can be created there: it must not exist or be an empty folder, and be
    writable (``files.check_output_path``).

    Raises:
        TypeError: not a path.
        FileExistsError: a non-empty folder.
        NotADirectoryError, PermissionError: as ``files.check_output_path``.
    """
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise TypeError(f"`out_dir` must be a folder path, got {_describe(out_dir)}")
    path = files.check_output_path(out_dir, folder=True)
    if path.is_dir() and any(path.iterdir()):
        raise FileExistsError(f"`out_dir` {os.fspath(out_dir)!r} is a folder that is not empty: name a new folder")
    return path


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {value!r:.60}"


def _check_checkpoint(checkpoint: object) -> Path:
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"`checkpoint` must be a path, got {_describe(checkpoint)}")
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"`checkpoint` {str(path)!r}: no such file")
    if path.suffix not in checkpoints.TORCH_SUFFIXES:
        raise ValueError(
            f"`checkpoint` must be a torch.save file ({', '.join(checkpoints.TORCH_SUFFIXES)}), got {str(path)!r}"
        )
    return path


def _normalize(state: object, what: str) -> dict[str, torch.Tensor]:
    """{key without ``net.`` / ``model.diffusion_model.``: tensor} of a state dict or a training checkpoint."""
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
        # A training checkpoint: the network is its ``net.`` entries (others, such as an EMA copy, are not read).
        if any(isinstance(key, str) and key.startswith("net.") for key in state):
            state = {key: value for key, value in state.items() if isinstance(key, str) and key.startswith("net.")}
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} holds a {type(state).__name__}, not a state dict")
    normalized: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{what} is no Wan state dict: entry {key!r} is {_describe(value)}, not a tensor")
        name = next((key[len(p) :] for p in _PREFIXES if key.startswith(p)), key)
        if name in normalized:
            raise ValueError(f"{what} holds {name!r} twice (with and without a {_PREFIXES} prefix)")
        normalized[name] = value
    return normalized


def _weight(state: Mapping[str, torch.Tensor], name: str, what: str) -> torch.Tensor:
    """The weight of Linear ``name``: ``name.weight``, or the int8 one of a quantized file."""
    for key in (f"{name}.weight", f"{name}.int8_weight"):
        if key in state:
            return state[key]
    raise ValueError(f"{what} is no Wan checkpoint: it holds no {name + '.weight'!r}")


def _infer(state: Mapping[str, torch.Tensor], given: dict | None, what: str) -> WanConfig:
    from diffusers import WanTransformer3DModel

    accepted = set(inspect.signature(WanTransformer3DModel.__init__).parameters) - {"self"}
    given = {key: value for key, value in (given or {}).items() if not key.startswith("_")}
    unknown = sorted(given.keys() - accepted)
    if unknown:
        raise ValueError(
            f"config entries {unknown} are no WanTransformer3DModel arguments (it takes {sorted(accepted)})"
        )
    if "patch_size" in given:
        given["patch_size"] = tuple(given["patch_size"])

    patch = _weight(state, "patch_embedding", what)
    shapes: dict[str, object] = {}
    if patch.dim() == 5:
        shapes["patch_size"] = tuple(patch.shape[2:])
    elif patch.dim() != 2:
        raise ValueError(f"{what}: 'patch_embedding.weight' must be 2-D or 5-D, got shape {list(patch.shape)}")
    patch_size = shapes.get("patch_size", given.get("patch_size", WAN_DEFAULTS["patch_size"]))
    patch_volume = math.prod(patch_size)
    dim = patch.shape[0]
    shapes["in_channels"] = _divide(patch.shape[1], 1 if patch.dim() == 5 else patch_volume, "patch_embedding", what)
    shapes["out_channels"] = _divide(_weight(state, "head.head", what).shape[0], patch_volume, "head.head", what)
    shapes["text_dim"] = _weight(state, "text_embedding.0", what).shape[1]
    shapes["freq_dim"] = _weight(state, "time_embedding.0", what).shape[1]
    shapes["ffn_dim"] = _weight(state, "blocks.0.ffn.0", what).shape[0]
    shapes["num_layers"] = 1 + max(int(m[1]) for key in state if (m := _BLOCK.match(key)))
    shapes["cross_attn_norm"] = "blocks.0.norm3.weight" in state
    image = "img_emb.proj.0.weight" in state
    shapes["image_dim"] = state["img_emb.proj.0.weight"].shape[0] if image else None
    k_img = any(key.startswith("blocks.0.cross_attn.k_img.") for key in state)
    shapes["added_kv_proj_dim"] = _weight(state, "blocks.0.cross_attn.k_img", what).shape[1] if k_img else None
    proj_l = state.get(_PROJ_L_KEY.format(0, "weight"))
    if proj_l is not None:
        shapes["attention_head_dim"] = proj_l.shape[-1]
        shapes["num_attention_heads"] = _divide(dim, proj_l.shape[-1], "proj_l (the head dim)", what)
    for key, value in shapes.items():
        if key in given and given[key] != value:
            raise ValueError(
                f"config entry {key!r} is {given[key]!r} but the shapes of {what} say {value!r}: the config is for "
                "another model"
            )

    config, from_config, from_kind = dict(shapes), [], []
    heads = ("num_attention_heads", "attention_head_dim")
    if proj_l is None:
        if any(key in given for key in heads):
            head_dim = given.get("attention_head_dim") or _divide(dim, given["num_attention_heads"], "heads", what)
            count = given.get("num_attention_heads") or _divide(dim, head_dim, "attention_head_dim", what)
            config |= {"num_attention_heads": count, "attention_head_dim": head_dim}
            from_config += [key for key in heads if key in given]
        elif dim in HEADS_BY_DIM:
            config |= {"num_attention_heads": HEADS_BY_DIM[dim], "attention_head_dim": HEAD_DIM}
            from_kind += heads
        else:
            raise ValueError(
                f"config entry 'num_attention_heads' is not decided by the shapes of {what}: its model dim {dim} is "
                f"none of the released models' ({sorted(HEADS_BY_DIM)}) and it holds no proj_l (whose shape gives "
                "the head dim): pass config= (--config) with a diffusers config.json"
            )
        if config["num_attention_heads"] * config["attention_head_dim"] != dim:
            raise ValueError(
                f"config entries num_attention_heads * attention_head_dim = {config['num_attention_heads']} * "
                f"{config['attention_head_dim']} but the shapes of {what} say the model dim is {dim}"
            )
    for key, default in WAN_DEFAULTS.items():
        if key not in config:
            config[key] = given.get(key, default)
            (from_config if key in given else from_kind).append(key)
    for key in sorted(given.keys() - config.keys()):
        config[key] = given[key]
        from_config.append(key)
    from_shapes = tuple(key for key in config if key in shapes)
    sizes = (dim, config["in_channels"], config["num_layers"], config["ffn_dim"], image)
    kind = next((k.name for k in WAN_KINDS if (k.dim, k.in_channels, k.num_layers, k.ffn_dim, k.image) == sizes), None)
    if kind is None or config["num_attention_heads"] != HEADS_BY_DIM[dim]:
        kind = "custom"
    return WanConfig(config, kind, from_shapes, tuple(from_config), tuple(from_kind))


def _divide(size: int, by: int, name: str, what: str) -> int:
    if by <= 0 or size % by:
        raise ValueError(f"{what}: {name}'s size {size} is not a multiple of {by}")
    return size // by


def _plan(state: dict[str, torch.Tensor], wan: WanConfig, model: torch.nn.Module, what: str) -> _Plan:
    """The conversion of ``state`` into ``model``'s tensors, every key, shape and dtype checked (nothing read)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    expected = {key: tensor.shape for key, tensor in model.state_dict().items()}
    recipes: dict[str, tuple] = {}
    sla: dict[str, str] = {}
    for key in state:
        if _PROJ_L.match(key):
            sla[checkpoints.model_key(key)] = key
        elif key.endswith(".int8_weight"):
            base = key.removesuffix(".int8_weight")
            if f"{base}.scale" not in state:
                raise ValueError(f"{what}: {key!r} is an int8 weight without its scale {base + '.scale'!r}")
            if f"{base}.weight" in state:
                raise ValueError(f"{what} holds both {key!r} and {base + '.weight'!r}")
            recipes[f"{base}.weight"] = ("dequantize", key, f"{base}.scale")
        elif not (key.endswith(".scale") and key.removesuffix(".scale") + ".int8_weight" in state):
            recipes[key] = ("copy", key)
    # diffusers' renaming, applied to the names alone: {diffusers key: checkpoint key}.
    try:
        renamed = convert_wan_transformer_to_diffusers({key: key for key in recipes})
    except Exception as error:
        raise ValueError(f"{what} is no Wan checkpoint: diffusers cannot rename its keys ({error!r})") from error
    if len(renamed) != len(recipes) or not all(isinstance(key, str) for key in renamed.values()):
        raise ValueError(f"{what} is no Wan checkpoint: diffusers' renaming maps two of its keys to one")
    problems = [f"unexpected key {renamed[key]!r} (diffusers: {key!r})" for key in renamed if key not in expected]
    problems += [f"missing the key diffusers names {key!r}" for key in expected if key not in renamed]
    plan = {}
    for key, source in renamed.items():
        if key in expected:
            recipe = recipes[source]
            if key == "patch_embedding.weight" and state[source].dim() == 2:
                recipe = ("patch", source, tuple(expected[key]))
            problem = _misfit(state, recipe, expected[key])
            if problem:
                problems.append(problem)
            plan[key] = recipe
    problems += _check_sla(state, sla, wan.config)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{what} does not fit a {wan.kind} WanTransformer3DModel: {problems[0]}{more}")
    return _Plan(state, plan, sla, what)


def _misfit(state: Mapping[str, torch.Tensor], recipe: tuple, shape: torch.Size) -> str | None:
    """What is wrong with a recipe's tensors for a model tensor of ``shape``, or None."""
    key = recipe[1]
    tensor = state[key]
    if recipe[0] == "dequantize":
        if tensor.dtype != torch.int8:
            return f"{key!r} is {_describe(tensor)}, want int8"
        scale = state[recipe[2]]
        tiles = [-(-size // QUANT_BLOCK) for size in tensor.shape]
        if not scale.is_floating_point() or list(scale.shape) != tiles:
            return f"{recipe[2]!r} is {_describe(scale)}, want a float32 tensor of shape {tiles}"
    elif not tensor.is_floating_point():
        return (
            f"{key!r} is {_describe(tensor)}, want a floating tensor (int8 weights come as <name>.int8_weight + .scale)"
        )
    if recipe[0] == "patch" and tensor.dim() == 2:
        fits = tensor.shape[0] == shape[0] and tensor.shape[1] == math.prod(shape[1:])
        want = f"[{shape[0]}, {math.prod(shape[1:])}] (or {list(shape)})"
    else:
        fits, want = tensor.shape == shape, str(list(shape))
    return None if fits else f"{key!r} has shape {list(tensor.shape)}, want {want}"


def _check_sla(state: Mapping[str, torch.Tensor], sla: Mapping[str, str], config: dict) -> list[str]:
    """Problems of the proj_l tensors: every block has both or none does; shapes [hd, hd] and [hd], floating. (The
    block count comes from every block key, proj_l's included: none lies beyond it.)"""
    if not sla:
        return []
    head_dim = config["attention_head_dim"]
    problems = []
    for block in range(config["num_layers"]):
        for name, shape in (("weight", [head_dim, head_dim]), ("bias", [head_dim])):
            key = _PROJ_L_KEY.format(block, name)
            tensor = state.get(key)
            if tensor is None:
                problems.append(f"missing {key!r} (other blocks have SLA weights)")
            elif not tensor.is_floating_point() or list(tensor.shape) != shape:
                problems.append(f"{key!r} is {_describe(tensor)}, want a floating tensor of shape {shape}")
    return problems


def _meta_model(config: dict) -> torch.nn.Module:
    """A ``WanTransformer3DModel`` of ``config`` on the meta device (no memory for its weights)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel(**config)


def _shard(model: torch.nn.Module, dtype: torch.dtype, max_shard_size: int):
    """huggingface_hub's split of the model's state dict in ``dtype`` into diffusers-named files."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from huggingface_hub import split_torch_state_dict_into_shards

    sizes = {key: torch.empty(value.shape, dtype=dtype, device="meta") for key, value in model.state_dict().items()}
    pattern = SAFETENSORS_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    return split_torch_state_dict_into_shards(sizes, filename_pattern=pattern, max_shard_size=max_shard_size)


@contextlib.contextmanager
def _new_folder(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` to fill, renamed to ``out`` on success and removed on any failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.{secrets.token_hex(8)}.tmp"
    temporary.mkdir()
    try:
        yield temporary
        # Replaces an empty folder at ``out`` (POSIX rename); fails if something else appeared there meanwhile.
        os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _write(folder: Path, model, plan: _Plan, shards, dtype: torch.dtype, progress: bool, name: str) -> None:
    """Write config.json, the weights shard by shard (each freed once written), the index when sharded, and the
    SLA weights."""
    from diffusers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME
    from tqdm import tqdm

    files.write_text_atomic(folder / CONFIG_NAME, model.to_json_string())
    with tqdm(total=len(plan.recipes), desc="converting", unit="tensor", disable=not progress) as bar:
        for filename, keys in shards.filename_to_tensors.items():
            bar.set_postfix_str(filename)
            shard = {}
            for key in keys:
                shard[key] = _convert(plan, key, dtype)
                bar.update()
            files.save_file_atomic(shard, folder / filename, {"format": "pt"})
            # Dequantized and cast tensors are new memory: one shard of them at a time.
            del shard
    if shards.is_sharded:
        index = {"metadata": dict(shards.metadata), "weight_map": shards.tensor_to_filename}
        files.write_text_atomic(folder / SAFE_WEIGHTS_INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
    if plan.sla:
        # proj_l stay float32, as SLA modules hold them.
        tensors = {
            key: _finite(plan.state[source].to(torch.float32), source, plan.what) for key, source in plan.sla.items()
        }
        checkpoints.save_sla_state_dict(tensors, folder / SLA_WEIGHTS_FILE, {"converted_from": name})


def _convert(plan: _Plan, key: str, dtype: torch.dtype) -> torch.Tensor:
    """Diffusers tensor ``key`` in ``dtype``, contiguous, checked finite."""
    recipe = plan.recipes[key]
    tensor = plan.state[recipe[1]]
    if recipe[0] == "dequantize":
        tensor = dequantize_blockwise(tensor, plan.state[recipe[2]])
    elif recipe[0] == "patch":
        tensor = tensor.reshape(recipe[2])
    return _finite(tensor.to(dtype).contiguous(), recipe[1], plan.what)


def _finite(tensor: torch.Tensor, key: str, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{what}: {key!r} holds NaN/Inf")
    return tensor
