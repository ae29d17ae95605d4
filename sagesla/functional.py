"""Functional SLA / SageSLA: validation, layout, dtype and backend dispatch.

Shapes: B batch, H heads, L tokens, D head dim; BQ / BK rows per query / key block; NK = ceil(L / BK).
"""

import torch

from sagesla import backends, ops, validation
from sagesla.kernels.block_select_ref import num_selected_blocks

SLA_BLOCK_SIZES = (64, 64)


def resolve_block_sizes(
    quantized: bool, device: torch.device, block_q: int | None = None, block_k: int | None = None
) -> tuple[int, int]:
    """(BQ, BK) a call uses: the given sizes, else 64 x 64 unquantized and the per-device default quantized."""
    default_q, default_k = backends.default_block_sizes(device) if quantized else SLA_BLOCK_SIZES
    return (default_q if block_q is None else block_q, default_k if block_k is None else block_k)


def sparse_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    topk: float,
    quantized: bool = True,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    feature_map: str = "softmax",
    linear_scope: str = "all",
    block_q: int | None = None,
    block_k: int | None = None,
    sm_scale: float | None = None,
    tensor_layout: str = "HND",
    compute_dtype: torch.dtype | None = None,
    pv_precision: str = "auto",
    backend: str = "auto",
    return_sparsity: bool = False,
    check_inputs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Sparse-Linear Attention: block-sparse softmax attention plus a linear-attention branch.

    ``o = o_s + proj_l(o_l)``: ``o_s`` attends, for each block of BQ queries, to the ``max(1, int(topk * NK))``
    key blocks whose pooled keys score highest against the pooled queries; ``o_l`` is linear attention with
    feature map phi over all tokens (``linear_scope="all"``) or over the unselected blocks ("complement").

    Args:
        q, k, v: [B, H, L, D] (``tensor_layout="HND"``) or [B, L, H, D] ("NHD"); fp16, bf16 or fp32, one dtype.
        topk: fraction of key blocks kept per query block, in (0, 1].
        quantized: SageSLA (INT8 Q/K per block, FP8 P/V) when True; 16-bit SLA math when False.
        proj_weight, proj_bias: ``proj_l`` weight [D, D] and bias [D]; no linear branch when ``proj_weight`` is None.
        feature_map: phi of the linear branch: "softmax" (over D), "elu" (elu + 1) or "relu".
        linear_scope: "all" or "complement".
        block_q, block_k: BQ, BK. Default: 64 x 128 on Hopper and 128 x 64 elsewhere when quantized, 64 x 64 when not.
        sm_scale: softmax scale, default D ** -0.5.
        tensor_layout: "HND" or "NHD"; the output has the same layout.
        compute_dtype: fp16 or bf16 the inputs are cast to; default the input dtype, bf16 for fp32 inputs.
        pv_precision: P.V precision when quantized: "fp8" (e4m3), "half" (compute dtype) or "auto"
            (the backend's fastest at its documented accuracy; "fp8" on the torch backend).
        backend: "auto", "torch" (plain PyTorch, any device) or "triton" (CUDA kernels; never falls back).
        return_sparsity: also return the fraction of (query block, key block) pairs skipped, a float.
            (thu-ml's SLA returns the fraction *kept* instead: ours is ``1 - kept``.)
        check_inputs: raise on NaN/Inf inputs (synchronizes with the device). Unchecked, a NaN/Inf input gives
            NaN wherever dense attention's output would be non-finite, and possibly in more rows of the same
            block or head, never a finite wrong value.
    Gradients: with ``quantized=False`` (SLA) the output is differentiable on both backends: autograd reaches q, k, v,
    ``proj_weight`` and ``proj_bias`` (the block selection is not differentiated). On Triton this runs the training
    kernels, which keep only o and its log-sum-exp for the backward. The quantized path is for inference only:
    with grad mode on, a q, k, v, ``proj_weight`` or ``proj_bias`` that requires grad raises ``RuntimeError`` at
    the call (run it under ``torch.no_grad()`` or ``torch.inference_mode()``, or train with ``quantized=False``).

    Returns:
        o in q's dtype and layout, or (o, sparsity) with ``return_sparsity``.
    Raises:
        TypeError / ValueError: invalid arguments (the message names the argument and what is accepted).
        NotImplementedError: ``backend="triton"`` asked for inputs it cannot serve.
        RuntimeError: ``quantized=True`` with inputs that require grad (see Gradients).
    Example:
        >>> q = k = v = torch.randn(1, 2, 256, 64)
        >>> o = sparse_linear_attn(q, k, v, topk=0.25, backend="torch")
    """
    compiling = torch.compiler.is_compiling()
    if not compiling:
        validation.check_qkv(q, k, v, tensor_layout)
        topk = validation.check_topk(topk)
        for name, value in (
            ("quantized", quantized),
            ("return_sparsity", return_sparsity),
            ("check_inputs", check_inputs),
        ):
            validation.check_bool(name, value)
        validation.check_choice("feature_map", feature_map, validation.FEATURE_MAPS)
        validation.check_choice("linear_scope", linear_scope, validation.LINEAR_SCOPES)
        validation.check_choice("pv_precision", pv_precision, validation.PV_PRECISIONS)
        validation.check_choice("backend", backend, validation.BACKENDS)
        validation.check_sm_scale(sm_scale)
        if compute_dtype is not None:
            validation.check_choice("compute_dtype", compute_dtype, validation.COMPUTE_DTYPES)
        validation.check_proj(proj_weight, proj_bias, q.shape[-1], q.device)
    # The quantized kernels record no autograd graph, and differentiating the reference through its INT8/FP8
    # rounding gives gradients of the wrong function: SageSLA refuses, on every backend, before any work.
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, proj_weight, proj_bias)
    )
    if needs_grad and quantized:
        validation.refuse_gradients(q, k, v, proj_weight, proj_bias)
    length, head_dim = q.shape[2 if tensor_layout == "HND" else 1], q.shape[-1]
    block_q, block_k = resolve_block_sizes(quantized, q.device, block_q, block_k)
    if not compiling:
        validation.check_block_sizes(block_q=block_q, block_k=block_k)
        if check_inputs:
            validation.check_finite(q, k, v)
    if compute_dtype is None:
        compute_dtype = q.dtype if q.dtype in validation.COMPUTE_DTYPES else torch.bfloat16
    num_key_blocks = -(-length // block_k)
    sparsity = 1.0 - num_selected_blocks(topk, num_key_blocks) / num_key_blocks if length else 0.0
    if pv_precision == "auto":
        pv_precision = backends.default_pv_precision(q.device)
    args = (q, k, v, proj_weight, proj_bias, topk, quantized, feature_map, linear_scope, block_q, block_k)
    args += (head_dim**-0.5 if sm_scale is None else float(sm_scale), tensor_layout, compute_dtype, pv_precision)
    # The inference op has no autograd formula: calls that need gradients take the trainable path.
    op = ops.train_sla if needs_grad else ops.sparse_linear_attn_op
    out = op(*args, backend)
    return (out, sparsity) if return_sparsity else out
