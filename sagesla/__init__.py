"""SageSLA: quantized Sparse-Linear Attention for video diffusion transformers.

Public API: ``SparseLinearAttention`` (trainable SLA), ``SageSparseLinearAttention`` (quantized inference),
``sparse_linear_attn`` (functional form), ``SLASettings`` (their settings as one object); ``patch`` / ``unpatch``
(SLA in diffusers Wan-family models and pipelines; ``dense_timesteps`` for its ``dense_steps``),
``load_sla_weights`` / ``save_sla_weights`` (SLA checkpoints). Importing this package imports neither triton nor
diffusers.
"""

from sagesla.functional import sparse_linear_attn
from sagesla.modules import SageSparseLinearAttention, SparseLinearAttention
from sagesla.patching import PatchReport, dense_timesteps, load_sla_weights, patch, save_sla_weights, unpatch
from sagesla.settings import SLASettings

__version__ = "0.1.0"

__all__ = [
    "PatchReport",
    "SLASettings",
    "SageSparseLinearAttention",
    "SparseLinearAttention",
    "__version__",
    "dense_timesteps",
    "load_sla_weights",
    "patch",
    "save_sla_weights",
    "sparse_linear_attn",
    "unpatch",
]
