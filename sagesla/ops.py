"""The one path of every SLA call: checks, the backend choice (once per call), and the custom operators.

``attend`` serves ``sparse_linear_attn`` and the modules alike. Inference calls run the PyTorch custom operator
``sagesla::sparse_linear_attn``, so ``torch.compile`` (``fullgraph=True``) and CUDA graphs see one opaque op whose
fake implementation gives the output's exact shape, dtype and layout; calls that need gradients run the trainable
path (``sagesla::sla_train_*`` in kernels/sla_train.py, autograd registered) or the differentiable reference.

The backend: an explicit ``backend="triton"`` never falls back (``NotImplementedError`` naming what it cannot
serve); ``backend="auto"`` falls back to ``"torch"`` and logs the reason once. Shapes: B batch, H heads, L tokens,
D head dim, T exact keys.
"""

import functools
import importlib.util
import logging
import os

import torch

from sagesla import validation
from sagesla.kernels.block_select_ref import MAX_KEY_BLOCKS, num_selected_blocks
from sagesla.kernels.sla_ref import sla_forward_ref
from sagesla.settings import SLASettings, cached, has_fp8_mma

logger = logging.getLogger("sagesla")

MAX_TRITON_HEAD_DIM = 256

# Looked up once at import: torch.compile traces triton_unsupported_reason (the Wan processor asks it on every
# call) and cannot trace importlib.
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


def _pow2_in(value: int, low: int, high: int) -> bool:
    return low <= value <= high and value & (value - 1) == 0


def triton_unsupported_reason(q: torch.Tensor, settings: SLASettings, *, has_exact: bool = False) -> str | None:
    """Why the Triton backend cannot serve ``q`` ([B, H, L, D] view) with resolved ``settings`` (and exact keys
    when ``has_exact``), or None."""
    if not _TRITON_IMPORTABLE:
        return "triton is not installed"
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the kernels need CUDA tensors, got {q.device.type} (TRITON_INTERPRET=1 runs them on CPU)"
    if settings.quantized and settings.linear_scope != "all":
        scope = settings.linear_scope
        return f"linear_scope={scope!r} runs on the torch backend (the SageSLA kernels fuse scope 'all')"
    if has_exact and not settings.quantized:
        return "exact keys with quantized=False run on the torch backend (the trainable SLA kernels have none)"
    if settings.quantized and settings.pv_precision == "fp8" and q.device.type == "cuda" and not has_fp8_mma(q.device):
        return "FP8 P.V needs an sm89+ GPU (use pv_precision='half')"
    if q.shape[-1] > MAX_TRITON_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_TRITON_HEAD_DIM}"
    block_q, block_k = settings.block_q, settings.block_k
    if not (_pow2_in(block_q, 16, 256) and _pow2_in(block_k, 32, 256)):
        return f"blocks {block_q}x{block_k}: the kernels need powers of two, BQ in [16, 256] and BK in [32, 256]"
    nk = -(-q.shape[-2] // block_k)
    if nk > MAX_KEY_BLOCKS:
        return f"{nk} key blocks > {MAX_KEY_BLOCKS} (the selection kernel's limit; use a larger block_k)"
    return None


def resolve_backend(q: torch.Tensor, settings: SLASettings, *, has_exact: bool = False) -> str:
    """ "torch" or "triton" for ``q`` ([B, H, L, D] view) with resolved ``settings`` (and exact keys)."""
    if settings.backend == "torch" or (settings.backend == "auto" and q.device.type != "cuda"):
        return "torch"
    reason = triton_unsupported_reason(q, settings, has_exact=has_exact)
    if reason is None:
        return "triton"
    if settings.backend == "triton":
        raise NotImplementedError(f"backend='triton' cannot serve this call: {reason}")
    _log_once(f"sagesla: backend='auto' uses the torch reference: {reason}")
    return "torch"


def forward_for(backend: str, quantized: bool):
    """The pipeline of a resolved backend; all share ``sla_forward_ref``'s signature.

    On Triton, SageSLA (``quantized``) is the inference pipeline and SLA the trainable one (with autograd).
    """
    if backend == "torch":
        return sla_forward_ref
    if quantized:
        from sagesla.kernels.sla import sla_forward

        return sla_forward
    from sagesla.kernels.sla_train import sla_train_forward

    return sla_train_forward


def _hnd_views(tensor_layout: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """[B, H, N, D] views of ``tensors`` given in ``tensor_layout``."""
    return [x if tensor_layout == "HND" else x.transpose(1, 2) for x in tensors]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk: float,
    settings: SLASettings,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    *,
    exact_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    exact_mask: torch.Tensor | None = None,
    return_sparsity: bool = False,
    check_inputs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, float]:
    """SLA of q, k, v with validated ``topk`` and ``settings`` (see ``sagesla.sparse_linear_attn``), joined by the
    exact keys ``exact_kv`` (masked by ``exact_mask``) when given.

    Checks the tensors (skipped while compiling), refuses gradients through the quantized path, resolves the
    settings for the device and the backend once, then runs the inference op or, when gradients are needed, the
    trainable path. Returns o in q's dtype and layout, or (o, fraction of block pairs skipped).
    """
    if not torch.compiler.is_compiling():
        validation.check_qkv(q, k, v, settings.tensor_layout)
        validation.check_bool("return_sparsity", return_sparsity)
        validation.check_bool("check_inputs", check_inputs)
        validation.check_proj(proj_weight, proj_bias, q.shape[-1], q.device)
        validation.check_exact(exact_kv, exact_mask, q, settings.tensor_layout)
    exact_k, exact_v = (None, None) if exact_kv is None else exact_kv
    # No extra keys (T = 0) change nothing: the call runs as one without them.
    if exact_k is not None and exact_k.shape[2 if settings.tensor_layout == "HND" else 1] == 0:
        exact_k = exact_v = exact_mask = None
    # The quantized kernels record no autograd graph, and differentiating the reference through its INT8/FP8
    # rounding gives gradients of the wrong function: SageSLA refuses, on every backend, before any work.
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, proj_weight, proj_bias, exact_k, exact_v)
    )
    if needs_grad and settings.quantized:
        validation.refuse_gradients(q, k, v, proj_weight, proj_bias, exact_k, exact_v)
    if check_inputs and not torch.compiler.is_compiling():
        validation.check_finite(q, k, v, exact_k, exact_v)
    resolved = settings.resolve(q.device)
    head_dim = q.shape[-1]
    compute_dtype = resolved.compute_dtype or (q.dtype if q.dtype in validation.COMPUTE_DTYPES else torch.bfloat16)
    sm_scale = head_dim**-0.5 if resolved.sm_scale is None else resolved.sm_scale
    q_hnd = _hnd_views(resolved.tensor_layout, q)[0]
    length = q_hnd.shape[2]
    num_key_blocks = -(-length // resolved.block_k)
    sparsity = 1.0 - num_selected_blocks(topk, num_key_blocks) / num_key_blocks if length else 0.0
    backend = resolve_backend(q_hnd, resolved, has_exact=exact_k is not None) if q.numel() else "torch"
    resolved = cached(_for_call)(resolved, backend, compute_dtype, sm_scale)
    tensors = (q, k, v, proj_weight, proj_bias, exact_k, exact_v, exact_mask)
    if needs_grad:
        out = _train_sla(*tensors, topk, resolved)
    else:
        out = sparse_linear_attn_op(*tensors, topk, *_op_fields(resolved))
    return (out, sparsity) if return_sparsity else out


@functools.lru_cache(maxsize=1024)
def _for_call(resolved: SLASettings, backend: str, compute_dtype: torch.dtype, sm_scale: float) -> SLASettings:
    """``resolved`` with what the call's tensors decide: once per distinct value (validation is host time)."""
    return resolved.replace(backend=backend, compute_dtype=compute_dtype, sm_scale=sm_scale)


# A custom op takes no dataclass: resolved settings cross it as their fields, in this order, and are rebuilt inside
# (once per distinct set of fields).
_FIELDS = tuple(field.name for field in SLASettings.__dataclass_fields__.values())
_from_fields = functools.lru_cache(maxsize=1024)(SLASettings)


def _op_fields(settings: SLASettings) -> tuple:
    return tuple(getattr(settings, name) for name in _FIELDS)


def _run_sla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    exact_k: torch.Tensor | None,
    exact_v: torch.Tensor | None,
    exact_mask: torch.Tensor | None,
    topk: float,
    settings: SLASettings,
) -> torch.Tensor:
    """SLA forward on the resolved backend of ``settings`` (contiguous output in q's shape, dtype and layout).

    The exact keys, when ``exact_k`` is given, reach the pipeline as its ``exact`` argument (HND views in the compute
    dtype); the trainable Triton pipeline, which takes none, never receives them (``triton_unsupported_reason``).
    """
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if q.numel() == 0:
        return out
    hnd = [x.to(settings.compute_dtype) for x in _hnd_views(settings.tensor_layout, q, k, v)]
    exact = {}
    if exact_k is not None:
        exact_hnd = [x.to(settings.compute_dtype) for x in _hnd_views(settings.tensor_layout, exact_k, exact_v)]
        exact["exact"] = (*exact_hnd, exact_mask)
    forward_for(settings.backend, settings.quantized)(
        *hnd,
        **_pipeline_arguments(topk, settings, proj_weight, proj_bias),
        **exact,
        quantized=settings.quantized,
        pv_precision=settings.pv_precision,
        out=out if settings.tensor_layout == "HND" else out.transpose(1, 2),
    )
    return out


def _pipeline_arguments(topk: float, settings: SLASettings, proj_weight, proj_bias) -> dict:
    """The keywords every pipeline takes (``sla_forward_ref``'s and ``sla_train``'s) from resolved settings."""
    return {
        "topk": topk,
        "block_q": settings.block_q,
        "block_k": settings.block_k,
        "sm_scale": settings.sm_scale,
        "feature_map": settings.feature_map,
        "linear_scope": settings.linear_scope,
        "proj_weight": proj_weight,
        "proj_bias": proj_bias,
    }


@torch.library.custom_op("sagesla::sparse_linear_attn", mutates_args=())
def sparse_linear_attn_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    exact_k: torch.Tensor | None,
    exact_v: torch.Tensor | None,
    exact_mask: torch.Tensor | None,
    topk: float,
    quantized: bool,
    feature_map: str,
    linear_scope: str,
    block_q: int,
    block_k: int,
    sm_scale: float,
    tensor_layout: str,
    compute_dtype: torch.dtype,
    pv_precision: str,
    backend: str,
) -> torch.Tensor:
    """The inference op (no autograd formula): ``_run_sla`` with resolved settings given as their fields; the exact
    keys (``exact_k``, ``exact_v`` in q's layout, ``exact_mask`` [B, T] bool) are None when there are none."""
    settings = _from_fields(
        quantized, feature_map, linear_scope, block_q, block_k, sm_scale, tensor_layout, compute_dtype, pv_precision,
        backend,
    )  # fmt: skip
    return _run_sla(q, k, v, proj_weight, proj_bias, exact_k, exact_v, exact_mask, topk, settings)


@sparse_linear_attn_op.register_fake
def _(q, k, v, proj_weight, proj_bias, *args) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _train_sla(
    q, k, v, proj_weight, proj_bias, exact_k, exact_v, exact_mask, topk: float, settings: SLASettings
) -> torch.Tensor:
    """A call that needs gradients (SLA, resolved settings): differentiable on every backend.

    The torch reference is differentiable as it stands, exact keys included (the trainable Triton path takes none:
    ``triton_unsupported_reason``). The trainable Triton path returns its autograd output itself (NHD as a
    transposed view of it), so the caller holds the tensor autograd saves rather than a copy; it is built of custom
    ops with autograd registered, which torch.compile traces without a graph break.
    """
    if settings.backend == "torch" or q.numel() == 0:
        return _run_sla(q, k, v, proj_weight, proj_bias, exact_k, exact_v, exact_mask, topk, settings)
    from sagesla.kernels.sla_train import sla_train

    hnd = [x.to(settings.compute_dtype) for x in _hnd_views(settings.tensor_layout, q, k, v)]
    o, _ = sla_train(*hnd, **_pipeline_arguments(topk, settings, proj_weight, proj_bias))
    o = o.to(q.dtype)
    return o if settings.tensor_layout == "HND" else o.transpose(1, 2)
