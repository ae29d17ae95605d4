"""``nn.Module`` forms, constructor- and state-dict-compatible with thu-ml/SLA.

State dict keys: ``proj_l.weight`` [D, D] and ``proj_l.bias`` [D], fp32, zero-initialised (so an un-finetuned
module computes exactly the sparse attention). TurboDiffusion's SLA checkpoints load unchanged.
"""

import torch
from torch import nn

from sagesla import ops, validation
from sagesla.settings import SLASettings


def _setting(field: str, doc: str) -> property:
    """A read-only view of one field of the module's ``settings`` under its thu-ml name."""
    return property(lambda self: getattr(self.settings, field), doc=doc)


class _SLABase(nn.Module):
    quantized: bool

    def __init__(
        self,
        head_dim: int,
        topk: float,
        feature_map: str,
        BLKQ: int | None,
        BLKK: int | None,
        use_bf16: bool,
        tie_feature_map_qk: bool,
        *,
        linear_scope: str,
        tensor_layout: str,
        backend: str,
        pv_precision: str,
    ):
        validation.check_block_sizes(BLKQ=BLKQ, BLKK=BLKK)
        validation.check_bool("use_bf16", use_bf16)
        settings = SLASettings(
            quantized=self.quantized,
            feature_map=feature_map,
            linear_scope=linear_scope,
            block_q=BLKQ,
            block_k=BLKK,
            tensor_layout=tensor_layout,
            compute_dtype=torch.bfloat16 if use_bf16 else torch.float16,
            pv_precision=pv_precision,
            backend=backend,
        )
        self._build(head_dim, topk, settings, tie_feature_map_qk)

    def _build(self, head_dim: int, topk: float, settings: SLASettings, tie_feature_map_qk: bool = True) -> None:
        super().__init__()
        validation.check_positive("head_dim", head_dim)
        self.topk = validation.check_topk(topk)
        self.head_dim = head_dim
        self.settings = settings
        # The feature maps hold no parameters, so q and k share one whatever this flag says.
        self.tie_feature_map_qk = tie_feature_map_qk
        self.proj_l = nn.Linear(head_dim, head_dim, dtype=torch.float32)
        # SageSLA records no gradients (``sparse_linear_attn`` refuses inputs that need them), so its weights are
        # frozen: a module built and called outside ``torch.no_grad()`` still runs.
        self.proj_l.requires_grad_(not self.quantized)
        self.init_weights_()

    feature_map = _setting("feature_map", "phi of the linear branch.")
    BLKQ = _setting("block_q", "Query block rows (None: per device).")
    BLKK = _setting("block_k", "Key block rows (None: per device).")
    dtype = _setting("compute_dtype", "The compute dtype (bf16 or fp16).")
    linear_scope = _setting("linear_scope", '"all" or "complement".')
    tensor_layout = _setting("tensor_layout", '"HND" or "NHD".')
    backend = _setting("backend", '"auto", "torch" or "triton".')
    pv_precision = _setting("pv_precision", '"auto", "fp8" or "half".')

    def init_weights_(self) -> None:
        """Zero ``proj_l``: the module then computes exactly the block-sparse attention."""
        with torch.no_grad():
            nn.init.zeros_(self.proj_l.weight)
            nn.init.zeros_(self.proj_l.bias)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        return_sparsity: bool = False,
        *,
        topk: float | None = None,
        exact_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        exact_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, float]:
        """Args: q, k, v [B, H, L, D] (or [B, L, H, D] with ``tensor_layout="NHD"``), D = ``head_dim``;
        ``topk`` for this call only (default ``self.topk``), so callers sharing the module never write its state;
        ``exact_kv`` = (k_x, v_x), each [B, H, T, D] (or [B, T, H, D]), extra keys every query attends exactly inside
        the sparse softmax, with ``exact_mask`` [B, T] bool (True = attend; None: all), as in
        ``sagesla.sparse_linear_attn``.

        Returns o in q's dtype and layout; with ``return_sparsity``, also the fraction of block pairs skipped.
        The linear branch runs with ``proj_l`` as it is at the call (an all-zero ``proj_l`` adds exactly zero).
        """
        if not torch.compiler.is_compiling() and isinstance(q, torch.Tensor) and q.shape[-1:] != (self.head_dim,):
            raise ValueError(f"`q` must have head_dim {self.head_dim} in its last dim, got shape {tuple(q.shape)}")
        return ops.attend(
            q,
            k,
            v,
            validation.check_topk(self.topk if topk is None else topk),
            self.settings,
            self.proj_l.weight,
            self.proj_l.bias,
            exact_kv=exact_kv,
            exact_mask=exact_mask,
            return_sparsity=return_sparsity,
        )

    def extra_repr(self) -> str:
        blocks = "per-arch" if self.BLKQ is None and self.BLKK is None else f"{self.BLKQ}x{self.BLKK}"
        return (
            f"head_dim={self.head_dim}, topk={self.topk}, feature_map={self.feature_map!r}, blocks={blocks}, "
            f"dtype={self.dtype}, linear_scope={self.linear_scope!r}, layout={self.tensor_layout!r}, "
            f"backend={self.backend!r}"
        )


class SparseLinearAttention(_SLABase):
    """Trainable SLA (unquantized): block-sparse softmax attention in fp16 / bf16 plus the linear branch.

    Args:
        head_dim: D.
        topk: fraction of key blocks each query block keeps, in (0, 1].
        feature_map: "softmax", "elu" or "relu" (phi of the linear branch).
        BLKQ, BLKK: query / key block rows.
        use_bf16: compute in bf16 (else fp16); the output keeps the input dtype.
        tie_feature_map_qk: accepted for compatibility (the feature maps are parameter-free).
        linear_scope: "all" (thu-ml's and TurboDiffusion's checkpoints) or "complement" (the paper's).
        tensor_layout: "HND" ([B, H, L, D]) or "NHD" ([B, L, H, D]).
        backend: "auto", "torch" or "triton".
    """

    quantized = False

    def __init__(
        self,
        head_dim: int,
        topk: float,
        feature_map: str = "softmax",
        BLKQ: int = 64,
        BLKK: int = 64,
        use_bf16: bool = True,
        tie_feature_map_qk: bool = True,
        *,
        linear_scope: str = "all",
        tensor_layout: str = "HND",
        backend: str = "auto",
    ):
        super().__init__(
            head_dim,
            topk,
            feature_map,
            BLKQ,
            BLKK,
            use_bf16,
            tie_feature_map_qk,
            linear_scope=linear_scope,
            tensor_layout=tensor_layout,
            backend=backend,
            pv_precision="auto",
        )


class SageSparseLinearAttention(_SLABase):
    """SageSLA: SLA for inference with INT8 Q/K (per block, K smoothed) and FP8 P/V.

    Args: as ``SparseLinearAttention``, plus
        BLKQ, BLKK: None picks per GPU architecture (64 x 128 on Hopper, 128 x 64 elsewhere).
        pv_precision: "auto", "fp8" or "half".
    """

    quantized = True

    def __init__(
        self,
        head_dim: int,
        topk: float,
        feature_map: str = "softmax",
        BLKQ: int | None = None,
        BLKK: int | None = None,
        use_bf16: bool = True,
        tie_feature_map_qk: bool = True,
        *,
        linear_scope: str = "all",
        tensor_layout: str = "HND",
        backend: str = "auto",
        pv_precision: str = "auto",
    ):
        super().__init__(
            head_dim,
            topk,
            feature_map,
            BLKQ,
            BLKK,
            use_bf16,
            tie_feature_map_qk,
            linear_scope=linear_scope,
            tensor_layout=tensor_layout,
            backend=backend,
            pv_precision=pv_precision,
        )


def sla_module(head_dim: int, topk: float, settings: SLASettings) -> SparseLinearAttention | SageSparseLinearAttention:
    """The module for ``settings``: ``SageSparseLinearAttention`` when quantized, else ``SparseLinearAttention``.

    Args: head_dim D; topk in (0, 1]; settings (a None ``compute_dtype`` becomes bf16, as the constructors' default).
    """
    if not isinstance(settings, SLASettings):
        raise TypeError(f"`settings` must be a sagesla.SLASettings, got {type(settings).__name__}")
    if settings.compute_dtype is None:
        settings = settings.replace(compute_dtype=torch.bfloat16)
    module_class = SageSparseLinearAttention if settings.quantized else SparseLinearAttention
    module = module_class.__new__(module_class)
    module._build(head_dim, topk, settings)
    return module
