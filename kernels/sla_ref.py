"""The whole SLA / SageSLA forward in plain PyTorch: the ``backend="torch"`` path.

Validation and layout handling live in ``sagesla.functional``; this takes checked HND views.
"""

import torch

from sagesla.kernels.block_select_ref import lut_to_mask, select_blocks_ref
from sagesla.kernels.constants import LOG2E
from sagesla.kernels.exact_keys_ref import exact_partials, merge_partials
from sagesla.kernels.kv_stats_ref import kv_stats_ref
from sagesla.kernels.linear_attn_ref import linear_attn_ref
from sagesla.kernels.quant_ref import pool_blocks_ref, quant_qk_ref, quant_v_fp8_ref
from sagesla.kernels.sparse_attn_ref import sparse_attn_quant_ref, sparse_attn_ref


def sla_forward_ref(
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
    exact: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """SLA forward: block selection, sparse branch (joined by the exact keys), linear branch, sum.

    Differentiable (unquantized): ``out`` receives the result through ``copy_``, so autograd reaches q, k, v and
    ``proj_l`` from it (the quantized path's rounding has no useful gradient).

    Args:
        q, k, v: [B, H, L, D] in the compute dtype (fp16 / bf16).
        topk: fraction of key blocks each query block keeps.
        block_q, block_k: BQ, BK.
        sm_scale: softmax scale.
        quantized: INT8 Q.K^T (SageSLA) when True, compute-dtype math (SLA) when False.
        pv_precision: "fp8" or "half" (P.V in the compute dtype); used when ``quantized``.
        feature_map, linear_scope: see ``linear_attn_ref``.
        proj_weight, proj_bias: ``proj_l``; the linear branch is skipped when ``proj_weight`` is None.
        out: [B, H, L, D] view of the output, written with ``o`` in its dtype.
        exact: (k_x [B, H, T, D], v_x [B, H, T, D], mask [B, T] bool or None) extra keys every query attends,
            inside the sparse branch's softmax (``docs/math.md``, "Exact keys"), or None.
    Returns:
        lut: [B, H, NQ, S] int32.
    """
    if quantized:
        stats = kv_stats_ref(k, v, pv_precision == "fp8", None)
        qk = quant_qk_ref(q, k, block_q, block_k, sm_scale * LOG2E, stats.k_mean)
        lut = select_blocks_ref(qk.q_pool, qk.k_pool, topk)
        v_q, v_scale = quant_v_fp8_ref(v, stats.v_amax) if stats.v_amax is not None else (v, None)
        o, lse = sparse_attn_quant_ref(
            qk.q_int8, qk.q_scale, qk.k_int8, qk.k_scale, v_q, v_scale, lut, block_q, block_k, return_lse=True
        )
        # The sparse scores are those of the smoothed K: the extra keys take the same shift, or the two
        # log-sum-exps would differ by q.k_mean.
        k_shift = stats.k_mean
    else:
        # The selection is not differentiated (as in the paper): gradients reach q, k, v through the branches.
        with torch.no_grad():
            k_smooth = k.float() - k.float().mean(dim=-2, keepdim=True)
            lut = select_blocks_ref(pool_blocks_ref(q, block_q), pool_blocks_ref(k_smooth, block_k), topk)
        o, lse = sparse_attn_ref(q, k, v, lut, block_q, block_k, sm_scale, return_lse=True)
        k_shift = None
    if exact is not None:
        k_x, v_x, key_mask = exact
        if k_shift is not None:
            k_x = k_x.float() - k_shift
        o = merge_partials(o, lse, *exact_partials(q, k_x, v_x, key_mask, sm_scale))
    if proj_weight is not None:
        mask = lut_to_mask(lut, -(-k.shape[-2] // block_k)) if linear_scope == "complement" else None
        o = o + linear_attn_ref(
            q,
            k,
            v,
            feature_map,
            proj_weight,
            proj_bias,
            scope=linear_scope,
            block_mask=mask,
            block_q=block_q,
            block_k=block_k,
        )
    out.copy_(o)
    return lut
