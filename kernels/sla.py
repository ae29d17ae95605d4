"""The SageSLA forward on the Triton kernels: the ``backend="triton"`` path, twin of ``sla_ref.sla_forward_ref``.

Launches: one pass over K and V for every token reduction (K mean, V channel maxima, linear state) and its
finishing launch (which also folds ``proj_l`` into the linear state and computes the FP8 V scales), INT8 Q and K
with pooling, block selection (an fp32 product of the pooled blocks, then the ranking), FP8 V (when P.V runs in
FP8), and the fused sparse + linear kernel. No host synchronisation and no data-dependent allocation.
Exact keys: their partial attention runs in PyTorch (``exact_keys_ref.exact_partials``; T is small) and the sparse
kernel merges it in its epilogue.
"""

import torch

from sagesla.kernels.block_select import select_blocks
from sagesla.kernels.constants import LOG2E
from sagesla.kernels.exact_keys_ref import exact_partials
from sagesla.kernels.kv_stats import inference_stats
from sagesla.kernels.quant import quant_qk, quant_v_fp8_scaled
from sagesla.kernels.sparse_attn import sparse_attn_fwd


def sla_forward(
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
    """SageSLA forward into ``out``; same contract as ``sla_forward_ref`` (quantized, linear_scope "all" only).

    Args:
        q, k, v: [B, H, L, D] views in the compute dtype with unit stride on D.
        out: [B, H, L, D] view of the output.
        exact: (k_x [B, H, T, D], v_x [B, H, T, D], mask [B, T] bool or None) extra keys every query attends, or
            None.
    Returns:
        lut: [B, H, NQ, S] int32.
    """
    if not quantized or linear_scope != "all":
        raise NotImplementedError("the Triton pipeline serves quantized attention with linear_scope='all'")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    pv_fp8 = pv_precision == "fp8"
    linear = proj_weight is not None
    stats = inference_stats(k, v, pv_fp8, feature_map if linear else None, proj_weight)
    qk = quant_qk(q, k, block_q, block_k, sm_scale * LOG2E, stats.k_mean)
    lut = select_blocks(qk.q_pool, qk.k_pool, topk)
    v_in = quant_v_fp8_scaled(v, stats.v_scale, qk.k_int8.shape[2]) if pv_fp8 else v
    fused = None
    if linear:
        bias = None if proj_bias is None else proj_bias.float().contiguous()
        fused = (q, stats.kvw, stats.z, stats.w_live, bias)
    partial = None
    if exact is not None:
        k_x, v_x, key_mask = exact
        # against the extra keys smoothed as K was, so both log-sum-exps carry the same shift
        o_x, lse_x = exact_partials(q, k_x.float() - stats.k_mean, v_x, key_mask, sm_scale)
        partial = (o_x, lse_x * LOG2E)
    sparse_attn_fwd(
        qk.q_int8,
        qk.q_scale,
        qk.k_int8,
        qk.k_scale,
        v_in,
        stats.v_scale,
        lut,
        block_q,
        block_k,
        out,
        linear=fused,
        exact=partial,
        feature_map=feature_map,
    )
    return lut
