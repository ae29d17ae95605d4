"""SLA as PyTorch custom operators, so ``torch.compile`` (``fullgraph=True``) and CUDA graphs see opaque ops.

``sagesla::sparse_linear_attn`` runs a validated inference call (the backend choice, the dtype cast and the kernels
happen inside); its fake implementation gives the output's exact shape, dtype and layout from the inputs alone,
which is what the compiler needs. Calls that need gradients go through ``train_sla``, built of the trainable
path's ops (``sagesla::sla_train_*`` in kernels/sla_train.py, autograd registered). Shapes: B batch, H heads,
L tokens, D head dim.
"""

import torch

from sagesla import backends


def _hnd_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_layout: str) -> list[torch.Tensor]:
    """[B, H, L, D] views of q, k, v given in ``tensor_layout``."""
    return [x if tensor_layout == "HND" else x.transpose(1, 2) for x in (q, k, v)]


def run_sla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
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
    """SLA forward of validated arguments (see ``sagesla.sparse_linear_attn``).

    Args:
        q, k, v: [B, H, L, D] ("HND") or [B, L, H, D] ("NHD"), one dtype.
        proj_weight, proj_bias: ``proj_l`` [D, D] and [D], or None for no linear branch.
        pv_precision: "fp8" or "half" (already resolved from "auto").
    Returns:
        o: q's shape, dtype and layout (contiguous).
    """
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if q.numel() == 0:
        return out
    hnd = [x.to(compute_dtype) for x in _hnd_views(q, k, v, tensor_layout)]
    chosen = backends.resolve_backend(backend, hnd[0], block_q, block_k, quantized, linear_scope, pv_precision)
    backends.forward_for(chosen, quantized)(
        *hnd,
        topk=topk,
        block_q=block_q,
        block_k=block_k,
        sm_scale=sm_scale,
        quantized=quantized,
        pv_precision=pv_precision,
        feature_map=feature_map,
        linear_scope=linear_scope,
        proj_weight=proj_weight,
        proj_bias=proj_bias,
        out=out if tensor_layout == "HND" else out.transpose(1, 2),
    )
    return out


def train_sla(*args) -> torch.Tensor:
    """``run_sla`` for calls that need gradients (same arguments): differentiable on every backend.

    The trainable Triton path returns its autograd output itself (NHD as a transposed view of it), so the caller
    holds the tensor autograd saves rather than a copy; it is built of custom ops with autograd registered
    (``sagesla::sla_train_*``), which torch.compile traces without a graph break.
    """
    q, k, v, proj_weight, proj_bias, topk, quantized, feature_map, linear_scope, block_q, block_k, *rest = args
    sm_scale, tensor_layout, compute_dtype, pv_precision, backend = rest
    if q.numel() == 0:
        return run_sla(*args)
    hnd = _hnd_views(q, k, v, tensor_layout)
    # The choice depends on device and shapes only, so it is made before any dtype copy.
    if backends.resolve_backend(backend, hnd[0], block_q, block_k, quantized, linear_scope, pv_precision) != "triton":
        return run_sla(*args)  # the torch reference, differentiable as it stands
    if quantized:
        return sparse_linear_attn_op(*args)  # the SageSLA kernels record no autograd graph: the opaque op
    hnd = [x.to(compute_dtype) for x in hnd]
    from sagesla.kernels.sla_train import sla_train

    o, _ = sla_train(
        *hnd,
        topk=topk,
        block_q=block_q,
        block_k=block_k,
        sm_scale=sm_scale,
        feature_map=feature_map,
        linear_scope=linear_scope,
        proj_weight=proj_weight,
        proj_bias=proj_bias,
    )
    o = o.to(q.dtype)
    return o if tensor_layout == "HND" else o.transpose(1, 2)


# The op (inference: no autograd formula; calls that need gradients go through ``train_sla``).
sparse_linear_attn_op = torch.library.custom_op("sagesla::sparse_linear_attn", run_sla, mutates_args=())


@sparse_linear_attn_op.register_fake
def _(q, k, v, proj_weight, proj_bias, *args) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)
