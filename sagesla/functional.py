"""Functional SLA / SageSLA: the keywords become one validated ``SLASettings``; ``ops.attend`` runs the call.

Shapes: B batch, H heads, L tokens, D head dim; BQ / BK rows per query / key block; NK = ceil(L / BK); T exact keys.
"""

import torch

from sagesla import ops, validation
from sagesla.settings import SLASettings


def sparse_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    topk: float,
    quantized: bool = True,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    exact_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    exact_mask: torch.Tensor | None = None,
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

    Exact keys (joint text + video attention): with ``exact_kv = (k_x, v_x)``, every query also attends every valid
    extra key exactly, inside the same softmax as its selected key blocks:
    ``o_s,i = (sum_{j selected} e^{s_ij} v_j + sum_{t valid} e^{s_it} v_x,t) / (sum_{j selected} e^{s_ij}
    + sum_{t valid} e^{s_it})``; the linear branch (over the L keys only) is added after. With ``topk=1`` and no
    ``proj_weight`` this is dense attention over the keys ``[k; k_x[exact_mask]]``.

    Args:
        q, k, v: [B, H, L, D] (``tensor_layout="HND"``) or [B, L, H, D] ("NHD"); fp16, bf16 or fp32, one dtype.
        topk: fraction of key blocks kept per query block, in (0, 1].
        quantized: SageSLA (INT8 Q/K per block, FP8 P/V) when True; 16-bit SLA math when False.
        proj_weight, proj_bias: ``proj_l`` weight [D, D] and bias [D]; no linear branch when ``proj_weight`` is None.
        exact_kv: (k_x, v_x) extra keys and values, each [B, H, T, D] ("HND") or [B, T, H, D] ("NHD"), with q's B,
            H, D, dtype and device; T >= 0 (T = 0 changes nothing). None: no extra keys.
        exact_mask: [B, T] bool, True where an extra key is attended (a masked key takes no part, whatever its
            values); None attends all. Only with ``exact_kv``.
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
        check_inputs: raise on NaN/Inf inputs, ``exact_kv`` included (synchronizes with the device). Unchecked, a
            NaN/Inf input gives NaN wherever dense attention's output would be non-finite, and possibly in more rows
            of the same block or head, never a finite wrong value.
    Gradients: with ``quantized=False`` (SLA) the output is differentiable on both backends: autograd reaches q, k, v,
    ``proj_weight``, ``proj_bias`` and ``exact_kv`` (the block selection is not differentiated). On Triton this runs
    the training kernels, which keep only o and its log-sum-exp for the backward; they take no exact keys, so SLA
    with ``exact_kv`` runs on the torch backend (``backend="auto"`` falls back, ``"triton"`` raises). The quantized path
    is for inference only: with grad mode on, a q, k, v, ``proj_weight``, ``proj_bias`` or ``exact_kv`` tensor that
    requires grad raises ``RuntimeError`` at the call (run it under ``torch.no_grad()`` or
    ``torch.inference_mode()``, or train with ``quantized=False``).

    Returns:
        o in q's dtype and layout, or (o, sparsity) with ``return_sparsity``.
    Raises:
        TypeError / ValueError: invalid arguments (the message names the argument and what is accepted).
        NotImplementedError: ``backend="triton"`` asked for inputs it cannot serve (e.g. ``exact_kv`` with
            ``quantized=False``).
        RuntimeError: ``quantized=True`` with inputs that require grad (see Gradients).
    Example:
        >>> q = k = v = torch.randn(1, 2, 256, 64)
        >>> o = sparse_linear_attn(q, k, v, topk=0.25, backend="torch")
    """
    settings = SLASettings(
        quantized=quantized,
        feature_map=feature_map,
        linear_scope=linear_scope,
        block_q=block_q,
        block_k=block_k,
        sm_scale=sm_scale,
        tensor_layout=tensor_layout,
        compute_dtype=compute_dtype,
        pv_precision=pv_precision,
        backend=backend,
    )
    return ops.attend(
        q,
        k,
        v,
        validation.check_topk(topk),
        settings,
        proj_weight,
        proj_bias,
        exact_kv=exact_kv,
        exact_mask=exact_mask,
        return_sparsity=return_sparsity,
        check_inputs=check_inputs,
    )
