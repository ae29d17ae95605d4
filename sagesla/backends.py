"""Backend choice: the Triton kernels on CUDA where they serve the inputs, the torch reference otherwise.

An explicit ``backend="triton"`` never falls back: it raises ``NotImplementedError`` naming what it cannot serve.
``backend="auto"`` falls back to ``"torch"`` and logs the reason once.
"""

import functools
import logging

import torch

from sagesla.kernels.sla_ref import sla_forward_ref

logger = logging.getLogger("sagesla")


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


def default_block_sizes(device: torch.device) -> tuple[int, int]:
    """(BQ, BK) of the quantized path: 64 x 128 on Hopper (sm90), 128 x 64 elsewhere (SpargeAttn's choice)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return 64, 128
    return 128, 64


def triton_unsupported_reason(q: torch.Tensor, block_q: int, block_k: int) -> str | None:
    """Why the Triton backend cannot serve these (already validated) inputs, or None if it can."""
    return "the Triton kernels are not part of this build yet"


def resolve_backend(requested: str, q: torch.Tensor, block_q: int, block_k: int) -> str:
    """Return "torch" or "triton" for a validated request."""
    if requested == "torch":
        return "torch"
    reason = triton_unsupported_reason(q, block_q, block_k)
    if reason is None:
        return "triton"
    if requested == "triton":
        raise NotImplementedError(f"backend='triton' cannot serve this call: {reason}")
    _log_once(f"sagesla: backend='auto' uses the torch reference: {reason}")
    return "torch"


def forward_for(backend: str):
    """The pipeline function of a resolved backend; both share ``sla_forward_ref``'s signature."""
    if backend == "torch":
        return sla_forward_ref
    raise NotImplementedError(f"no pipeline for backend {backend!r}")
