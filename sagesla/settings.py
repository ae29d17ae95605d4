"""``SLASettings``: how an SLA call computes, validated once where it is built and handed down whole.

Every entry point builds one (``sparse_linear_attn`` from its keywords, the modules from their constructors,
``patch`` from its keywords, calibration from the modules it records, a profile from its header) and passes it on;
nothing below re-validates or re-reads loose arguments. The per-device defaults ("auto" precision, ``None``
blocks) are resolved here and nowhere else (``resolve``). ``topk`` is not a setting: it is how much attention a call
keeps, given per layer, per timestep or per call.
"""

import dataclasses
import functools

import torch

from sagesla import validation

# Blocks of the unquantized (trainable) path: thu-ml SLA's.
SLA_BLOCK_SIZES = (64, 64)


def is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def has_fp8_mma(device: torch.device) -> bool:
    """Whether the GPU multiplies FP8 on its tensor cores (sm89+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@dataclasses.dataclass(frozen=True)
class SLASettings:
    """The settings of an SLA call, everything but the tensors and topk. Frozen; built validated.

    Attributes:
        quantized: SageSLA (INT8 Q/K per block, FP8 or 16-bit P.V; inference) or SLA (16-bit math; trainable).
        feature_map: phi of the linear branch: "softmax" (over D), "elu" (elu + 1) or "relu".
        linear_scope: "all" (thu-ml's and TurboDiffusion's checkpoints) or "complement" (the paper's).
        block_q, block_k: BQ, BK rows per query / key block; None: per device (``resolve``).
        sm_scale: softmax scale; None: D ** -0.5.
        tensor_layout: "HND" ([B, H, L, D]) or "NHD" ([B, L, H, D]).
        compute_dtype: fp16 or bf16 the inputs are cast to; None: the input dtype, bf16 for fp32 inputs.
        pv_precision: P.V precision when quantized: "fp8" (e4m3), "half" (compute dtype) or "auto" (``resolve``).
        backend: "auto", "torch" (plain PyTorch, any device) or "triton" (CUDA kernels; never falls back).
    Raises (when built):
        TypeError / ValueError naming the field, what arrived and what is accepted.
    """

    quantized: bool = True
    feature_map: str = "softmax"
    linear_scope: str = "all"
    block_q: int | None = None
    block_k: int | None = None
    sm_scale: float | None = None
    tensor_layout: str = "HND"
    compute_dtype: torch.dtype | None = None
    pv_precision: str = "auto"
    backend: str = "auto"

    def __post_init__(self) -> None:
        validation.check_bool("quantized", self.quantized)
        validation.check_choice("feature_map", self.feature_map, validation.FEATURE_MAPS)
        validation.check_choice("linear_scope", self.linear_scope, validation.LINEAR_SCOPES)
        validation.check_block_sizes(block_q=self.block_q, block_k=self.block_k)
        validation.check_sm_scale(self.sm_scale)
        validation.check_choice("tensor_layout", self.tensor_layout, validation.TENSOR_LAYOUTS)
        if self.compute_dtype is not None:
            validation.check_choice("compute_dtype", self.compute_dtype, validation.COMPUTE_DTYPES)
        validation.check_choice("pv_precision", self.pv_precision, validation.PV_PRECISIONS)
        validation.check_choice("backend", self.backend, validation.BACKENDS)
        if self.sm_scale is not None:
            object.__setattr__(self, "sm_scale", float(self.sm_scale))

    def replace(self, **changes: object) -> "SLASettings":
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    def default_block_sizes(self, device: torch.device) -> tuple[int, int]:
        """(BQ, BK) where ``block_q`` / ``block_k`` are None: 64 x 64 unquantized (thu-ml SLA's); quantized,
        64 x 128 on Hopper (sm90) and 128 x 64 elsewhere (SpargeAttn's choice)."""
        if not self.quantized:
            return SLA_BLOCK_SIZES
        return (64, 128) if is_hopper(device) else (128, 64)

    def resolve(self, device: torch.device) -> "SLASettings":
        """These settings with the per-device defaults fixed for ``device``: the blocks, and ``pv_precision="auto"``
        as FP8 where the GPU multiplies FP8 (sm89+, faster at the documented accuracy: benchmarks/experiments.md,
        "P.V precision: FP8 against 16-bit"), 16-bit on older GPUs, FP8 (the design's recipe) on CPU."""
        return cached(_resolved)(self, device)


def cached(function):
    """``function``'s ``functools.lru_cache`` in eager mode; the function itself while torch.compile traces (a graph
    runs no Python, and dynamo warns on cache wrappers)."""
    return function.__wrapped__ if torch.compiler.is_compiling() else function


# Every call resolves its settings: a pure function of two immutable values, so it is computed once per pair
# (building a validated SLASettings costs microseconds of host time, which a sub-millisecond forward feels).
@functools.lru_cache(maxsize=256)
def _resolved(settings: SLASettings, device: torch.device) -> SLASettings:
    default_q, default_k = settings.default_block_sizes(device)
    pv_precision = settings.pv_precision
    if pv_precision == "auto":
        pv_precision = "half" if device.type == "cuda" and not has_fp8_mma(device) else "fp8"
    return dataclasses.replace(
        settings,
        block_q=default_q if settings.block_q is None else settings.block_q,
        block_k=default_k if settings.block_k is None else settings.block_k,
        pv_precision=pv_precision,
    )
