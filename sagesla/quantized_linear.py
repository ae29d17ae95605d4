"""Quantized linear layers for a video transformer's blocks, through torchao: the companion of ``sagesla.patch``.

With SLA the attention of a denoising step is cheap, so the linear layers (Q/K/V/O projections, cross-attention,
MLP) are most of what is left. ``quantize_linear`` swaps the weights of every ``nn.Linear`` inside the model's
repeated transformer blocks for torchao's dynamically quantized ones, in place: W8A8 int8 (one scale per weight
row and per activation token) or FP8 e4m3 with per-row scales on GPUs that multiply FP8 (sm89+). SLA's ``proj_l``
(under ``SparseLinearAttention`` / ``SageSparseLinearAttention``) stays exact, as TurboDiffusion keeps it, so
``sagesla.patch`` may run before or after, and ``sagesla.load_sla_weights`` still loads it. Embeddings, the
timestep / text conditioning and the output projection stay as they are.

Compile the model (``torch.compile``) for speed: eager, torchao quantizes each activation in kernels of its own and
the step is slower than in bf16. A Wan2.1-1.3B SageSLA forward at 32760 tokens on an H100 (torchao 0.17, FP8):
333 ms eager, 548 ms eager + FP8; 207 ms compiled, 175 ms compiled + FP8 (benchmarks/README.md, "Whole videos").

It cannot be undone: reload the weights to get the unquantized model back. torchao's configs also set its
recommended ``torch._inductor`` options (``set_inductor_config``), process-wide.

TurboDiffusion's ``-quant`` checkpoints store int8 weights with one scale per 128 x 128 block; torchao's int8 W8A8
takes one scale per output row, so their weights are dequantized by the checkpoint converter and requantized here,
rounding twice: the unquantized checkpoints are the better start.

Example:
    >>> sagesla.patch(pipe.transformer, topk=0.1)
    >>> print(sagesla.quantize_linear(pipe.transformer))  # "auto": fp8 on a bf16 model on sm89+, int8 otherwise
"""

import dataclasses

import torch
from torch import nn

from sagesla import validation
from sagesla.modules import SageSparseLinearAttention, SparseLinearAttention
from sagesla.settings import has_fp8_mma

MODES = ("auto", "int8", "fp8")
# ``skipped`` reasons.
PROJ_L = "proj_l: SLA's linear branch stays exact"
OUTSIDE_BLOCKS = "outside the transformer blocks"
TORCHAO_KEPT = "torchao left it unquantized"
# torchao's float8 matmul needs both feature counts a multiple of 16; int8 gains nothing on smaller layers.
_FEATURE_MULTIPLE = 16
_NAMES_SHOWN = 4


def _tiny(min_features: int) -> str:
    return f"tiny: in or out features < {min_features} or not a multiple of {_FEATURE_MULTIPLE}"


@dataclasses.dataclass(frozen=True)
class LinearQuantizationReport:
    """The outcome of ``quantize_linear``.

    Attributes:
        mode: "int8" or "fp8" (what "auto" resolved to).
        config: the torchao config applied, e.g. "Int8DynamicActivationInt8WeightConfig".
        quantized: names of the linear layers now quantized, e.g. ``("blocks.0.attn1.to_q", ...)``.
        skipped: linear layer name -> why it was left as it was (``PROJ_L``, ``OUTSIDE_BLOCKS`` or the tiny reason).
        bytes_before: the model's parameter bytes before (every parameter, quantized layers' or not).
        bytes_after: the same after: quantized weights count their int8 / fp8 data, scales and zero points.
    """

    mode: str
    config: str
    quantized: tuple[str, ...]
    skipped: dict[str, str]
    bytes_before: int
    bytes_after: int

    def __str__(self) -> str:
        mib_before, mib_after = self.bytes_before / 2**20, self.bytes_after / 2**20
        lines = [
            f"sagesla.quantize_linear: {len(self.quantized)} linear layer(s) -> {self.mode} ({self.config}); "
            f"parameters {mib_before:.1f} MiB -> {mib_after:.1f} MiB",
            f"  quantized {len(self.quantized)}: {_names(list(self.quantized))}",
        ]
        groups: dict[str, list[str]] = {}
        for name, reason in self.skipped.items():
            groups.setdefault(reason, []).append(name)
        lines.extend(f"  skipped {len(names)}, {reason}: {_names(names)}" for reason, names in groups.items())
        return "\n".join(lines)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown if len(names) <= _NAMES_SHOWN else f"{shown}, ... ({len(names)} in all)"


def _is_block_list(module: nn.Module) -> bool:
    """Whether ``module`` is a list of repeated transformer blocks: a non-empty ``nn.ModuleList`` of one class of
    modules that hold submodules (Wan's ``blocks``; not a ``to_out`` [Linear, Dropout] or a list of bare layers)."""
    items = list(module.children()) if isinstance(module, nn.ModuleList) else []
    return bool(items) and len({type(item) for item in items}) == 1 and any(items[0].children())


def _prefixes(model: nn.Module, kind) -> list[str]:
    """Names of the outermost submodules of ``model`` (the model itself: "") for which ``kind(module)`` holds."""
    found: list[str] = []
    for name, module in model.named_modules():
        if kind(module) and not any(_is_under(name, outer) for outer in found):
            found.append(name)
    return found


def _is_under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _is_quantized(weight: torch.Tensor) -> bool:
    """A weight some quantization replaced by a tensor subclass (torchao's ``Int8Tensor``, ``Float8Tensor``, ...)."""
    return type(weight) not in (torch.Tensor, nn.Parameter)


def _select(model: nn.Module, min_features: int) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """({name: layer} to quantize, {name: reason} left alone) over every ``nn.Linear`` of ``model``."""
    blocks = _prefixes(model, _is_block_list)
    sla = _prefixes(model, lambda m: isinstance(m, (SparseLinearAttention, SageSparseLinearAttention)))
    chosen, skipped = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if any(_is_under(name, prefix) for prefix in sla):
            skipped[name] = PROJ_L
        elif not any(_is_under(name, prefix) for prefix in blocks):
            skipped[name] = OUTSIDE_BLOCKS
        elif not all(n >= min_features and n % _FEATURE_MULTIPLE == 0 for n in module.weight.shape):
            skipped[name] = _tiny(min_features)
        else:
            chosen[name] = module
    return chosen, skipped


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's quantized weights) counts its inner tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _parameter_bytes(model: nn.Module) -> int:
    return sum(_tensor_bytes(p) for p in model.parameters())


def _fp8_limit(layers: dict[str, nn.Linear]) -> str | None:
    """Why torchao's per-row FP8 cannot serve ``layers``, or None: it needs bf16 weights on a CUDA GPU of compute
    capability >= 8.9."""
    for name, layer in layers.items():
        device, dtype = layer.weight.device, layer.weight.dtype
        if not has_fp8_mma(device):
            if device.type == "cuda":
                major, minor = torch.cuda.get_device_capability(device)
                device = f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"
            return f"{name} is on {device}; FP8 needs a CUDA GPU of compute capability >= 8.9"
        if dtype != torch.bfloat16:
            return f"{name} is {dtype}; torchao's per-row FP8 takes bfloat16 weights (model.to(torch.bfloat16))"
    return None


def _config(mode: str):
    """torchao's config for ``mode``, imported here: torchao is optional, and importing it is slow."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
        )
    except ImportError as error:
        raise ImportError("sagesla.quantize_linear needs torchao: pip install torchao") from error
    if mode == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    # torchao's default: per-token symmetric activations, per-row symmetric weights.
    return Int8DynamicActivationInt8WeightConfig()


def quantize_linear(model: nn.Module, mode: str = "auto", min_features: int = 128) -> LinearQuantizationReport:
    """Quantize the linear layers of ``model``'s transformer blocks with torchao, in place (cannot be undone).

    The layers: every ``nn.Linear`` under an ``nn.ModuleList`` of repeated blocks (Wan's ``blocks``, other
    diffusers models' ``transformer_blocks`` / ``single_transformer_blocks``, ...), except those under an SLA module
    (``proj_l``) and those with in or out features below ``min_features`` or not a multiple of 16. Activations are
    quantized on the fly at each call; the output keeps the input's dtype.

    Args:
        model: a diffusers transformer (patched by ``sagesla.patch`` or not) or any module with such blocks.
        mode: "int8" (``Int8DynamicActivationInt8WeightConfig``: int8 weights, one scale per output row, and int8
            activations, one scale per token; runs on CPU too), "fp8" (``Float8DynamicActivationFloat8WeightConfig``
            with per-row scales, e4m3; bf16 weights on a CUDA GPU of compute capability >= 8.9) or "auto" (fp8
            where the layers can take it, int8 otherwise).
        min_features: the smallest in / out feature count quantized (smaller layers gain nothing).
    Returns:
        what was quantized and skipped (``LinearQuantizationReport``).
    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``min_features`` not an int.
        ValueError: ``mode`` or ``min_features`` out of range; a block layer is already quantized; no layer is
            eligible.
        NotImplementedError: ``mode="fp8"`` on weights FP8 cannot serve (device or dtype), named in the message.
        ImportError: torchao is not installed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module (a diffusers transformer), got {type(model).__name__}")
    validation.check_choice("mode", mode, MODES)
    if not validation.is_number(min_features, int):
        raise TypeError(f"`min_features` must be an int >= 1, got {type(min_features).__name__} {min_features!r}")
    if min_features < 1:
        raise ValueError(f"`min_features` must be an int >= 1, got {min_features!r}")
    chosen, skipped = _select(model, min_features)
    done = [name for name, layer in chosen.items() if _is_quantized(layer.weight)]
    if done:
        raise ValueError(
            f"`model` is already quantized ({_names(done)} hold {type(chosen[done[0]].weight).__name__} weights): "
            "quantizing twice would round twice; reload the unquantized weights first"
        )
    if not chosen:
        reasons = sorted(set(skipped.values())) or ["the model has no nn.Linear"]
        raise ValueError(f"`model` has no linear layer to quantize (min_features={min_features}): {reasons}")
    limit = _fp8_limit(chosen)
    if mode == "fp8" and limit is not None:
        raise NotImplementedError(f"mode='fp8' cannot serve this model: {limit}; use mode='int8' or 'auto'")
    resolved = "int8" if mode == "int8" or limit is not None else "fp8"
    config = _config(resolved)
    from torchao.quantization import quantize_

    bytes_before = _parameter_bytes(model)
    selected = set(chosen.values())
    quantize_(model, config, filter_fn=lambda module, name: module in selected)
    # torchao returns some weights as they were (shapes its kernels do not take): report them, not as quantized.
    quantized = tuple(name for name, layer in chosen.items() if _is_quantized(layer.weight))
    skipped |= {name: TORCHAO_KEPT for name in chosen if name not in quantized}
    return LinearQuantizationReport(
        resolved, type(config).__name__, quantized, skipped, bytes_before, _parameter_bytes(model)
    )
