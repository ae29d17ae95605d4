"""Backend choice: the Triton kernels on CUDA where they serve the inputs, the torch reference otherwise.

An explicit ``backend="triton"`` never falls back: it raises ``NotImplementedError`` naming what it cannot serve.
``backend="auto"`` falls back to ``"torch"`` and logs the reason once.
"""

import functools
import importlib.util
import logging
import os

import torch

from sagesla.kernels.block_select_ref import MAX_KEY_BLOCKS
from sagesla.kernels.sla_ref import sla_forward_ref

logger = logging.getLogger("sagesla")

MAX_TRITON_HEAD_DIM = 256


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


def _is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def default_block_sizes(device: torch.device) -> tuple[int, int]:
    """(BQ, BK) of the quantized path: 64 x 128 on Hopper (sm90), 128 x 64 elsewhere (SpargeAttn's choice)."""
    return (64, 128) if _is_hopper(device) else (128, 64)


def _has_fp8_mma(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def default_pv_precision(device: torch.device) -> str:
    """P.V precision for ``pv_precision="auto"``: the faster one at the documented accuracy on this device.

    FP8 where the GPU multiplies FP8 (sm89+): on an H100 the FP8 loop measured 1.7x faster than the 16-bit one
    (benchmarks/results), within the FP8 error bound. 16-bit on older GPUs; FP8 (the design's recipe) on CPU.
    """
    return "half" if device.type == "cuda" and not _has_fp8_mma(device) else "fp8"


# Looked up once at import: torch.compile traces triton_unsupported_reason (the Wan processor asks it on every
# call) and cannot trace importlib.
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def _pow2_in(value: int, low: int, high: int) -> bool:
    return low <= value <= high and value & (value - 1) == 0


def triton_unsupported_reason(
    q: torch.Tensor, block_q: int, block_k: int, quantized: bool, linear_scope: str, pv_precision: str
) -> str | None:
    """Why the Triton backend cannot serve these (already validated) inputs, or None if it can."""
    if not _TRITON_IMPORTABLE:
        return "triton is not installed"
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the kernels need CUDA tensors, got {q.device.type} (TRITON_INTERPRET=1 runs them on CPU)"
    if quantized and linear_scope != "all":
        return f"linear_scope={linear_scope!r} runs on the torch backend (the SageSLA kernels fuse scope 'all')"
    if quantized and pv_precision == "fp8" and q.device.type == "cuda" and not _has_fp8_mma(q.device):
        return "FP8 P.V needs an sm89+ GPU (use pv_precision='half')"
    if q.shape[-1] > MAX_TRITON_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_TRITON_HEAD_DIM}"
    if not (_pow2_in(block_q, 16, 256) and _pow2_in(block_k, 32, 256)):
        return f"blocks {block_q}x{block_k}: the kernels need powers of two, BQ in [16, 256] and BK in [32, 256]"
    nk = -(-q.shape[-2] // block_k)
    if nk > MAX_KEY_BLOCKS:
        return f"{nk} key blocks > {MAX_KEY_BLOCKS} (the selection kernel's limit; use a larger block_k)"
    return None


def resolve_backend(
    requested: str,
    q: torch.Tensor,
    block_q: int,
    block_k: int,
    quantized: bool,
    linear_scope: str,
    pv_precision: str,
) -> str:
    """Return "torch" or "triton" for a validated request."""
    if requested == "torch":
        return "torch"
    if requested == "auto" and q.device.type != "cuda":
        return "torch"
    reason = triton_unsupported_reason(q, block_q, block_k, quantized, linear_scope, pv_precision)
    if reason is None:
        return "triton"
    if requested == "triton":
        raise NotImplementedError(f"backend='triton' cannot serve this call: {reason}")
    _log_once(f"sagesla: backend='auto' uses the torch reference: {reason}")
    return "torch"


def forward_for(backend: str, quantized: bool):
    """The pipeline function of a resolved backend; all share ``sla_forward_ref``'s signature.

    On Triton, SageSLA (``quantized``) is the inference pipeline and SLA the trainable one (with autograd).
    """
    if backend == "torch":
        return sla_forward_ref
    if quantized:
        from sagesla.kernels.sla import sla_forward

        return sla_forward
    from sagesla.kernels.sla_train import sla_train_forward

    return sla_train_forward
