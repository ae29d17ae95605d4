"""SageSLA: quantized Sparse-Linear Attention for video diffusion transformers.

Public API: ``SparseLinearAttention`` (trainable SLA), ``SageSparseLinearAttention`` (quantized inference),
``sparse_linear_attn`` (functional form), ``SLASettings`` (their settings as one object); ``patch`` / ``unpatch``
(SLA in diffusers video transformers and pipelines; ``dense_timesteps`` for its ``dense_steps``), ``SageSLAConfig``
+ ``apply_sage_sla`` / ``remove_sage_sla`` (the same as a config object, diffusers-style; ``SageSLAConfig.preset``),
``load_sla_weights`` / ``save_sla_weights`` (SLA checkpoints), ``quantize_linear`` (torchao-quantized linear layers
beside SLA). ``sagesla.rcm`` (rCM few-step sampling) and ``sagesla.turbodiffusion`` (TurboDiffusion checkpoints into
diffusers) are imported on their own. Importing this package imports neither triton nor diffusers.
"""

from sagesla.functional import sparse_linear_attn
from sagesla.modules import SageSparseLinearAttention, SparseLinearAttention
from sagesla.patching import (
    PatchReport,
    SageSLAConfig,
    apply_sage_sla,
    dense_timesteps,
    load_sla_weights,
    patch,
    remove_sage_sla,
    save_sla_weights,
    unpatch,
)
from sagesla.quantized_linear import LinearQuantizationReport, quantize_linear
from sagesla.settings import SLASettings

__version__ = "0.1.0"

__all__ = [
    "LinearQuantizationReport",
    "PatchReport",
    "SLASettings",
    "SageSLAConfig",
    "SageSparseLinearAttention",
    "SparseLinearAttention",
    "__version__",
    "apply_sage_sla",
    "dense_timesteps",
    "load_sla_weights",
    "patch",
    "quantize_linear",
    "remove_sage_sla",
    "save_sla_weights",
    "sparse_linear_attn",
    "unpatch",
]
