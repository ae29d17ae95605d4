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

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from sagesla.kernels.block_select import select_blocks
from sagesla.kernels.linear_attn import linear_attn_bwd_q, linear_state
from sagesla.kernels.quant import kv_stats, quant_qk
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


class SLATrainFunction(torch.autograd.Function):
    """``out = o_s + proj_l(o_l)`` written into ``out`` (marked dirty, saved); gradients to q, k, v, weight, bias.

    ``kv``, ``ksum`` (the linear state of k and v, computed without autograd) are inputs only to share the pass
    over K and V with the selection; the backward carries their dependence on k and v itself.
    """

    @staticmethod
    def forward(ctx, out, q, k, v, weight, bias, lut, kv, ksum, spec: TrainSpec):
        has_linear = spec.linear in ("all", "complement")
        bias = None if bias is None or spec.linear == "none" else bias.float().contiguous()
        lse = sparse_attn_train_fwd(
            q,
            k,
            v,
            lut,
            spec.block_q,
            spec.block_k,
            spec.sm_scale,
            out,
            linear=linear_state(kv, ksum, weight) if has_linear else None,
            bias=bias,
            feature_map=spec.feature_map,
            complement=spec.linear == "complement",
        )
        ctx.mark_dirty(out)
        ctx.save_for_backward(q, k, v, out, lse, lut, kv, ksum, weight, bias)
        ctx.spec = spec
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        q, k, v, out, lse, lut, kv, ksum, weight, bias = ctx.saved_tensors
        spec = ctx.spec
        if d_out.stride(-1) != 1:
            d_out = d_out.contiguous()
        complement = spec.linear == "complement"
        linear = None
        if spec.linear in ("all", "complement"):
            state = linear_state(kv, ksum, weight)
            linear = linear_attn_bwd_q(
                q, k, v, d_out, out, bias, lut, state, weight, spec.feature_map, complement, spec.block_q, spec.block_k
            )
        dq = dk = dv = None
        if any(ctx.needs_input_grad[1:4]):
            dq, dk, dv = sparse_attn_train_bwd(
                q,
                k,
                v,
                out,
                lse,
                d_out,
                lut,
                spec.block_q,
                spec.block_k,
                spec.sm_scale,
                linear=linear,
                bias=bias if linear is None else None,
                feature_map=spec.feature_map,
                complement=complement,
            )
        d_weight = d_bias = None
        if spec.linear == "bias":
            d_weight = torch.zeros_like(weight)
            d_bias = None if bias is None else d_out.float().sum(dim=(0, 1, 2))
        elif linear is not None:
            d_weight = linear.dweight.to(weight.dtype)
            d_bias = None if bias is None else linear.dbias
        return None, dq, dk, dv, d_weight, d_bias, None, None, None, None


def sla_train_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    topk: float,
    block_q: int,
    block_k: int,
    sm_scale: float,
    quantized: bool,
    pv_precision: str,
    feature_map: str,
    linear_scope: str,
    proj_weight: torch.Tensor | None,
    proj_bias: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """Trainable SLA forward into ``out`` (differentiable); same contract as ``sla_forward_ref`` with quantized=False.

    Args:
        q, k, v: [B, H, L, D] views in the compute dtype (fp16 / bf16).
        out: [B, H, L, D] view of the output, written with ``o`` in its dtype; autograd reaches q, k, v,
            ``proj_weight`` and ``proj_bias`` from it.
        pv_precision: ignored (P.V runs in the compute dtype).
    Returns:
        lut: [B, H, NQ, S] int32.
    """
    if quantized:
        raise NotImplementedError("sla_train_forward serves the unquantized SLA (quantized=False)")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    with torch.no_grad():
        stats = kv_stats(k, v, False, None if proj_weight is None else feature_map)
        # quant_qk's INT8 copies are unused here: it is the one-pass pooling of Q and smoothed K.
        pools = quant_qk(q, k, block_q, block_k, 1.0, stats.k_mean)
        lut = select_blocks(pools.q_pool, pools.k_pool, topk)
    sparse_linear_train(
        q,
        k,
        v,
        lut,
        stats.kv,
        stats.ksum,
        block_q=block_q,
        block_k=block_k,
        sm_scale=sm_scale,
        feature_map=feature_map,
        linear_scope=linear_scope,
        proj_weight=proj_weight,
        proj_bias=proj_bias,
        out=out,
    )
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
    out: torch.Tensor,
) -> torch.Tensor:
    """SLA with a given selection, differentiable: writes and returns ``out``.

    Args:
        q, k, v: [B, H, L, D] views in the compute dtype with unit stride on D.
        lut: [B, H, NQ, S] int32, ascending.
        kv, ksum: the linear state ``kv_stats(k, v, False, feature_map)`` ([B, H, D, D], [B, H, D] fp32), or None
            without ``proj_weight``.
        out: [B, H, L, D] view of the output (any float dtype, unit stride on D).
    """
    linear = "none" if proj_weight is None else linear_scope
    if linear == "complement" and lut.shape[-1] == -(-q.shape[-2] // block_k):
        linear = "bias"
    spec = TrainSpec(block_q, block_k, sm_scale, feature_map, linear)
    return SLATrainFunction.apply(out, q, k, v, proj_weight, proj_bias, lut.contiguous(), kv, ksum, spec)
