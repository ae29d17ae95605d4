"""SageSLA: quantized Sparse-Linear Attention for video diffusion transformers.

Public API: ``SparseLinearAttention`` (trainable SLA), ``SageSparseLinearAttention`` (quantized inference),
``sparse_linear_attn`` (functional form). Importing this package does not import triton.
"""

from sagesla.functional import sparse_linear_attn
from sagesla.modules import SageSparseLinearAttention, SparseLinearAttention

__version__ = "0.1.0"

__all__ = [
    "SageSparseLinearAttention",
    "SparseLinearAttention",
    "__version__",
    "sparse_linear_attn",
]
