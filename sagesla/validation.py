"""Argument checks of the public API. Each error names the argument, what arrived and what is accepted."""

import math

import torch

from sagesla.kernels import linear_attn_ref

FEATURE_MAPS = linear_attn_ref.FEATURE_MAPS
LINEAR_SCOPES = linear_attn_ref.LINEAR_SCOPES
TENSOR_LAYOUTS = ("HND", "NHD")
BACKENDS = ("auto", "torch", "triton")
PV_PRECISIONS = ("auto", "fp8", "half")
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
COMPUTE_DTYPES = (torch.float16, torch.bfloat16)
PROJ_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _shape_letters(layout: str, tokens: str = "L") -> str:
    return f"[B, H, {tokens}, D]" if layout == "HND" else f"[B, {tokens}, H, D]"


def is_number(value: object, kinds: type | tuple[type, ...] = (int, float)) -> bool:
    """Whether ``value`` is an instance of ``kinds`` and not a bool (which Python counts as an int)."""
    return not isinstance(value, bool) and isinstance(value, kinds)


def check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")


def check_topk(topk: object, name: str = "topk") -> float:
    """topk must be a real number in (0, 1]; ``name`` is how the error names the argument."""
    if not is_number(topk):
        raise TypeError(f"`{name}` must be a float in (0, 1], got {type(topk).__name__} {topk!r}")
    if not (0.0 < float(topk) <= 1.0):
        raise ValueError(f"`{name}` must be in (0, 1] (the fraction of key blocks kept), got {topk!r}")
    return float(topk)


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__} {value!r}")


def check_positive(name: str, value: object, kind: type = int) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a ``kind`` (int or float, not bool) above zero."""
    if not is_number(value, kind) or not value > 0:
        raise ValueError(f"`{name}` must be a positive {kind.__name__}, got {value!r}")


def check_block_size(name: str, value: object) -> None:
    if not is_number(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int (rows per block), got {value!r}")


def check_block_sizes(**sizes: object) -> None:
    """``check_block_size`` for each name=value given, None meaning "the default" (accepted)."""
    for name, value in sizes.items():
        if value is not None:
            check_block_size(name, value)


def check_sm_scale(sm_scale: object) -> None:
    if sm_scale is None:
        return
    if not is_number(sm_scale) or not math.isfinite(sm_scale):
        raise ValueError(f"`sm_scale` must be a finite positive float or None, got {sm_scale!r}")
    if sm_scale <= 0:
        raise ValueError(f"`sm_scale` must be positive, got {sm_scale!r}")


def check_qkv(q: object, k: object, v: object, tensor_layout: str) -> None:
    """q, k, v: same 4-D shape, float dtype, device."""
    check_choice("tensor_layout", tensor_layout, TENSOR_LAYOUTS)
    letters = _shape_letters(tensor_layout)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor {letters}, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"`{name}` must have shape {letters} for tensor_layout={tensor_layout!r}, got {tuple(x.shape)}"
            )
        if x.dtype not in INPUT_DTYPES:
            raise TypeError(f"`{name}` must have dtype float16, bfloat16 or float32, got {x.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"`{name}` must have the shape of `q` {tuple(q.shape)} {letters}, got {tuple(x.shape)}")
        _check_like_q(name, x, q)
    _check_has_data("q", q)  # k and v are on its device
    if q.shape[-1] == 0:
        raise ValueError(f"`q` must have a head dim D >= 1 (its last dim), got shape {tuple(q.shape)}")


def check_proj(proj_weight: object, proj_bias: object, head_dim: int, device: torch.device) -> None:
    """proj_l: weight [D, D] and optional bias [D], floating, on the inputs' device."""
    if proj_weight is None:
        if proj_bias is not None:
            raise ValueError("`proj_bias` was given without `proj_weight`")
        return
    for name, x, shape in (("proj_weight", proj_weight, (head_dim, head_dim)), ("proj_bias", proj_bias, (head_dim,))):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.dtype not in PROJ_DTYPES:
            kind = f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(
                f"`{name}` must be a float32, float16 or bfloat16 torch.Tensor of shape {shape}, got {kind}"
            )
        _check_has_data(name, x)
        if tuple(x.shape) != shape:
            raise ValueError(f"`{name}` must have shape {shape} (head_dim D={head_dim}), got {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"`{name}` must be on the device of `q` ({device}), got {x.device}")


def check_exact(exact_kv: object, exact_mask: object, q: torch.Tensor, tensor_layout: str) -> None:
    """exact_kv: None or a (k, v) pair of tensors [B, H, T, D] ([B, T, H, D] for "NHD") with q's B, H, D, dtype and
    device, any T >= 0; exact_mask: None or [B, T] bool on q's device, only with exact_kv. ``q`` is checked."""
    if exact_kv is None:
        if exact_mask is not None:
            raise ValueError("`exact_mask` was given without `exact_kv`")
        return
    letters = _shape_letters(tensor_layout, "T")
    if not isinstance(exact_kv, (tuple, list)) or len(exact_kv) != 2:
        kind = type(exact_kv).__name__
        if isinstance(exact_kv, (tuple, list)):
            kind += f" of length {len(exact_kv)}"
        raise TypeError(f"`exact_kv` must be a (k, v) pair of torch.Tensor {letters}, got {kind}")
    token_dim = 2 if tensor_layout == "HND" else 1
    others = q.shape[:token_dim] + q.shape[token_dim + 1 :]
    for name, x in zip(("exact_kv[0]", "exact_kv[1]"), exact_kv, strict=True):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor {letters}, got {type(x).__name__}")
        _check_like_q(name, x, q)
        _check_has_data(name, x)
        if x.dim() != 4 or x.shape[:token_dim] + x.shape[token_dim + 1 :] != others:
            raise ValueError(
                f"`{name}` must have shape {letters} for tensor_layout={tensor_layout!r}, with the B, H, D of `q` "
                f"{tuple(q.shape)}, got {tuple(x.shape)}"
            )
    k_x, v_x = exact_kv
    if v_x.shape != k_x.shape:
        raise ValueError(
            f"`exact_kv[1]` must have the shape of `exact_kv[0]` {tuple(k_x.shape)}, got {tuple(v_x.shape)}"
        )
    if exact_mask is None:
        return
    shape = (q.shape[0], k_x.shape[token_dim])
    if not isinstance(exact_mask, torch.Tensor) or exact_mask.dtype != torch.bool:
        kind = f"{exact_mask.dtype} tensor" if isinstance(exact_mask, torch.Tensor) else type(exact_mask).__name__
        raise TypeError(
            f"`exact_mask` must be None or a torch.bool tensor [B, T] = {shape} (True = attend), got {kind}"
        )
    if tuple(exact_mask.shape) != shape:
        raise ValueError(f"`exact_mask` must have shape [B, T] = {shape}, got {tuple(exact_mask.shape)}")
    if exact_mask.device != q.device:
        raise ValueError(f"`exact_mask` must be on the device of `q` ({q.device}), got {exact_mask.device}")


def _check_like_q(name: str, x: torch.Tensor, q: torch.Tensor) -> None:
    """``x`` has q's dtype and device."""
    if x.dtype != q.dtype:
        raise TypeError(f"`{name}` must have the dtype of `q` ({q.dtype}), got {x.dtype}")
    if x.device != q.device:
        raise ValueError(f"`{name}` must be on the device of `q` ({q.device}), got {x.device}")


def _check_has_data(name: str, x: torch.Tensor) -> None:
    """Meta tensors (a model built under ``init_empty_weights`` or on ``device="meta"``) hold no values."""
    if x.is_meta:
        raise ValueError(f"`{name}` is a meta tensor (shape only, no data); load or materialise it first")


def refuse_gradients(q, k, v, proj_weight, proj_bias, exact_k=None, exact_v=None) -> None:
    """Raise for a quantized call whose inputs require grad (called with grad mode on)."""
    tensors = (
        ("q", q), ("k", k), ("v", v), ("proj_weight", proj_weight), ("proj_bias", proj_bias),
        ("exact_kv[0]", exact_k), ("exact_kv[1]", exact_v),
    )  # fmt: skip
    names = [name for name, x in tensors if x is not None and x.requires_grad]
    raise RuntimeError(
        f"quantized=True (SageSLA) is inference-only and records no gradients, but {', '.join(names)} require(s) "
        "grad: run it under torch.no_grad() or torch.inference_mode(), or train with quantized=False "
        "(SparseLinearAttention; patch(..., quantized=False)) and serve the trained weights quantized"
    )


def check_finite(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    exact_k: torch.Tensor | None = None,
    exact_v: torch.Tensor | None = None,
) -> None:
    """Raise if any input holds NaN or Inf (synchronizes with the device: opt-in only)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("exact_kv[0]", exact_k), ("exact_kv[1]", exact_v)):
        if x is not None and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"`{name}` holds {bad} NaN/Inf value(s); check_inputs=True rejects non-finite inputs")
