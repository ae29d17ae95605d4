"""The trainable SLA on the Triton kernels: the unquantized ``backend="triton"`` path, with autograd.

Twin of ``sla_ref.sla_forward_ref`` (``quantized=False``), whose torch autograd is the reference for the gradients.
Forward: one pass over K and V for the K mean and the linear state (``kv_stats``), pooling and block selection
(not differentiated, as in the paper), then the fused sparse + linear kernel. Backward: the linear branch's query
side (``linear_attn_bwd_q``), then dQ and dK/dV (``sparse_attn_train_bwd``). No host synchronisation and no
data-dependent allocation in either.

Saved for the backward: q, k, v, the output itself, the LSE ([B*H, L] fp32), the look-up table and the [D, D]
linear state per head: what SDPA keeps plus O(L / block) metadata (the sparse branch's own output is recovered as
``out - proj_l(o_l)`` in the backward, which recomputes the linear branch).
"""

import dataclasses
from dataclasses import dataclass

import torch

from sagesla.kernels.block_select import select_blocks
from sagesla.kernels.block_select_ref import num_selected_blocks
from sagesla.kernels.kv_stats import kv_stats
from sagesla.kernels.linear_attn_train import linear_attn_bwd_q, linear_state
from sagesla.kernels.quant import quant_qk
from sagesla.kernels.sparse_attn_train import sparse_attn_train_bwd, sparse_attn_train_fwd


@dataclass(frozen=True)
class TrainSpec:
    """Static settings of one call. ``linear``: "none", "all", "complement", or "bias" (scope "complement" with
    every key block selected: the branch is exactly ``proj_l(0) = b``, so only the bias remains)."""

    block_q: int
    block_k: int
    sm_scale: float
    feature_map: str
    linear: str


def _has_linear(linear: str) -> bool:
    return linear in ("all", "complement")


def _empty(like: torch.Tensor) -> torch.Tensor:
    """Stands for an absent tensor among a custom op's outputs (an op returns no None)."""
    return like.new_empty(0, dtype=torch.float32)


# The kernels as custom operators with autograd registered, so torch.compile traces the trainable path without a
# graph break. Settings travel as plain arguments (TrainSpec's fields).
@torch.library.custom_op("sagesla::sla_train_select", mutates_args=())
def select_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: float, block_q: int, block_k: int, feature_map: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lut [B, H, NQ, S] int32, kv [B, H, D, D], ksum [B, H, D] fp32); kv / ksum empty when ``feature_map`` is ""."""
    stats = kv_stats(k, v, False, feature_map or None)
    # quant_qk's INT8 copies are unused here: it is the one-pass pooling of Q and smoothed K.
    pools = quant_qk(q, k, block_q, block_k, 1.0, stats.k_mean)
    lut = select_blocks(pools.q_pool, pools.k_pool, topk)
    return lut, _empty(q) if stats.kv is None else stats.kv, _empty(q) if stats.ksum is None else stats.ksum


@select_op.register_fake
def _(q, k, v, topk, block_q, block_k, feature_map):
    B, H, L, D = q.shape
    lut = q.new_empty(B, H, -(-L // block_q), num_selected_blocks(topk, -(-L // block_k)), dtype=torch.int32)
    if not feature_map:
        return lut, _empty(q), _empty(q)
    return lut, q.new_empty(B, H, D, D, dtype=torch.float32), q.new_empty(B, H, D, dtype=torch.float32)


@torch.library.custom_op("sagesla::sla_train_fwd", mutates_args=())
def forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lut: torch.Tensor,
    kv: torch.Tensor | None,
    ksum: torch.Tensor | None,
    block_q: int,
    block_k: int,
    sm_scale: float,
    feature_map: str,
    linear: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, L, D] in q's dtype, lse [B*H, L] fp32); ``linear`` as ``TrainSpec.linear``."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = sparse_attn_train_fwd(
        q,
        k,
        v,
        lut,
        block_q,
        block_k,
        sm_scale,
        out,
        linear=linear_state(kv, ksum, weight) if _has_linear(linear) else None,
        bias=None if bias is None or linear == "none" else bias.float().contiguous(),
        feature_map=feature_map,
        complement=linear == "complement",
    )
    return out, lse


@forward_op.register_fake
def _(q, k, v, weight, bias, lut, kv, ksum, block_q, block_k, sm_scale, feature_map, linear):
    B, H, L, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B * H, L, dtype=torch.float32)


@torch.library.custom_op("sagesla::sla_train_bwd", mutates_args=())
def backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lut: torch.Tensor,
    kv: torch.Tensor | None,
    ksum: torch.Tensor | None,
    block_q: int,
    block_k: int,
    sm_scale: float,
    feature_map: str,
    linear: str,
    need_qkv: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d_weight, d_bias); dq, dk, dv empty unless ``need_qkv`` (fine-tuning proj_l alone skips the
    sparse backward); d_weight / d_bias empty where the branch or the bias is absent."""
    d_out = d_out.contiguous()
    bias32 = None if bias is None or linear == "none" else bias.float().contiguous()
    complement = linear == "complement"
    grads = None
    if _has_linear(linear):
        grads = linear_attn_bwd_q(
            q,
            k,
            v,
            d_out,
            out,
            bias32,
            lut,
            linear_state(kv, ksum, weight),
            weight,
            feature_map,
            complement,
            block_q,
            block_k,
        )
    dq, dk, dv = _empty(q), _empty(q), _empty(q)
    if need_qkv:
        dq, dk, dv = sparse_attn_train_bwd(
            q,
            k,
            v,
            out,
            lse,
            d_out,
            lut,
            block_q,
            block_k,
            sm_scale,
            linear=grads,
            bias=bias32 if grads is None else None,
            feature_map=feature_map,
            complement=complement,
        )
    d_weight, d_bias = _empty(q), _empty(q)
    if linear == "bias":
        d_weight = torch.zeros_like(weight)
        d_bias = _empty(q) if bias is None else d_out.float().sum(dim=(0, 1, 2)).to(bias.dtype)
    elif grads is not None:
        d_weight = grads.dweight.to(weight.dtype)
        d_bias = _empty(q) if bias is None else grads.dbias.to(bias.dtype)
    return dq, dk, dv, d_weight, d_bias


@backward_op.register_fake
def _(q, k, v, out, lse, d_out, weight, bias, lut, kv, ksum, block_q, block_k, sm_scale, feature_map, linear, need):
    d_weight = _empty(q) if weight is None or linear == "none" else torch.empty_like(weight)
    d_bias = _empty(q) if bias is None or linear == "none" else torch.empty_like(bias)
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v)) if need else (_empty(q), _empty(q), _empty(q))
    return dq, dk, dv, d_weight, d_bias


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, weight, bias, lut, kv, ksum, *settings = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], weight, bias, lut, kv, ksum)
    ctx.settings = settings


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse, weight, bias, lut, kv, ksum = ctx.saved_tensors
    linear, need_qkv = ctx.settings[-1], any(ctx.needs_input_grad[:3])
    grads = backward_op(q, k, v, out, lse, d_out, weight, bias, lut, kv, ksum, *ctx.settings, need_qkv)
    dq, dk, dv = grads[:3] if need_qkv else (None, None, None)
    d_weight = None if weight is None or linear == "none" else grads[3]
    d_bias = None if bias is None or linear == "none" else grads[4]
    return dq, dk, dv, d_weight, d_bias, None, None, None, None, None, None, None, None


forward_op.register_autograd(_backward, setup_context=_setup_context)


def sla_train(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    topk: float,
    block_q: int,
    block_k: int,
    sm_scale: float,
    feature_map: str,
    linear_scope: str,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trainable SLA, differentiable to q, k, v, ``proj_weight`` and ``proj_bias``.

    Args:
        q, k, v: [B, H, L, D] views in the compute dtype (fp16 / bf16).
    Returns:
        (o [B, H, L, D] contiguous in q's dtype: the very tensor autograd saves, so a caller keeping it holds no
        second copy; lut [B, H, NQ, S] int32).
    """
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    with torch.no_grad():
        lut, kv, ksum = select_op(q, k, v, topk, block_q, block_k, "" if proj_weight is None else feature_map)
    o = sparse_linear_train(
        q,
        k,
        v,
        lut,
        kv,
        ksum,
        block_q=block_q,
        block_k=block_k,
        sm_scale=sm_scale,
        feature_map=feature_map,
        linear_scope=linear_scope,
        proj_weight=proj_weight,
        proj_bias=proj_bias,
    )
    return o, lut


def sla_train_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    quantized: bool,
    pv_precision: str,
    out: torch.Tensor,
    **settings,
) -> torch.Tensor:
    """``sla_train`` into ``out``: the pipeline contract of ``sla_forward_ref`` with quantized=False.

    Args:
        q, k, v: [B, H, L, D] views in the compute dtype (fp16 / bf16).
        out: [B, H, L, D] view of the output, written with ``o`` in its dtype (differentiably).
        pv_precision: ignored (P.V runs in the compute dtype).
        settings: ``sla_train``'s keyword arguments.
    Returns:
        lut: [B, H, NQ, S] int32.
    """
    if quantized:
        raise NotImplementedError("sla_train_forward serves the unquantized SLA (quantized=False)")
    o, lut = sla_train(q, k, v, **settings)
    out.copy_(o)
    return lut


def sparse_linear_train(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    kv: torch.Tensor | None,
    ksum: torch.Tensor | None,
    *,
    block_q: int,
    block_k: int,
    sm_scale: float,
    feature_map: str,
    linear_scope: str,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """SLA with a given selection, differentiable: returns o [B, H, L, D] in q's dtype (written into ``out`` if given).

    Args:
        q, k, v: [B, H, L, D] views in the compute dtype with unit stride on D.
        lut: [B, H, NQ, S] int32, ascending.
        kv, ksum: the linear state ``kv_stats(k, v, False, feature_map)`` ([B, H, D, D], [B, H, D] fp32), or None
            without ``proj_weight``.
        out: None, or a [B, H, L, D] view (any float dtype) to copy o into.
    """
    linear = "none" if proj_weight is None else linear_scope
    if linear == "complement" and lut.shape[-1] == -(-q.shape[-2] // block_k):
        linear = "bias"
    spec = TrainSpec(block_q, block_k, sm_scale, feature_map, linear)
    o = forward_op(q, k, v, proj_weight, proj_bias, lut.contiguous(), kv, ksum, *dataclasses.astuple(spec))[0]
    return o if out is None else out.copy_(o)
