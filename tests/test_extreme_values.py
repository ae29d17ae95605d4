"""Extreme inputs: tiny and huge scales, outlier tokens and channels, constant rows, tied keys, a zero block.

Every case runs the torch reference (SLA, SageSLA with FP8 and 16-bit P.V) and the Triton kernels (under the
interpreter without a GPU, with the GPU's NaN-dropping min / max) and checks: a finite output, and rel-L1 against
the float64 SLA with the path's own block selection within the case's bound. The bounds are documented in the
README ("Guarantees and limits"); the measured worst values (3 seeds, both dtypes) are in the comments.
"""

from collections.abc import Callable

import pytest
import torch

from sagesla.kernels.constants import FP8_MAX
from sagesla.kernels.quant import quant_v_fp8
from sagesla.kernels.quant_ref import quant_v_fp8_ref
from sagesla.testing import BOUND_SAGESLA, BOUND_SLA, FORWARD_PATHS, assert_close, run_forward, sla_dense_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 64
OUTLIER = 1e4
# A token (or channel) of magnitude 1e4 against unit-scale others, |x| <= 1e4 so fp16 holds it.
SPOT = 100


def _outlier(x: torch.Tensor) -> torch.Tensor:
    return OUTLIER * x.clamp(-3, 3) / 3


def _scaled(factor: float) -> Callable:
    return lambda q, k, v: (q * factor, k * factor, v * factor)


def _token_outlier(which: int) -> Callable:
    def apply(*qkv):
        qkv = [x.clone() for x in qkv]
        qkv[which][..., SPOT, :] = _outlier(qkv[which][..., SPOT, :])
        return qkv

    return apply


def _v_channel_outlier(q, k, v):
    v = v.clone()
    v[..., 3] = _outlier(v[..., 3])
    return q, k, v


def _constant_rows(*qkv):
    """Every token's vector holds one value in all channels."""
    return [x[..., :1].expand_as(x).contiguous() for x in qkv]


def _equal_keys(q, k, v):
    """Every key the same vector: all pooled scores tie, the attention is uniform over the selected keys."""
    return q, k[..., :1, :].expand_as(k).contiguous(), v


def _zero_block(*qkv):
    qkv = [x.clone() for x in qkv]
    for x in qkv:
        x[..., BLOCK : 2 * BLOCK, :] = 0.0
    return qkv


# Bounds of the quantized paths (SLA keeps BOUND_SLA everywhere: measured <= 1.6e-3 torch, 5.7e-3 Triton).
# Inputs x1e3 make base-2 scores ~1e5-1e6: attention is one-hot and an INT8 rounding of a score can flip the argmax
# (measured 4.6e-2 torch, 5.8e-2 Triton, FP8 P.V; 16-bit P.V 2.6e-2 / 4.0e-2).
BOUND_PEAKED = 1e-1
# One Q token of 1e4 takes its block's INT8 scale: the block's other queries quantize to about zero and attend
# almost uniformly (measured 0.63-0.68); the other blocks keep BOUND_SAGESLA (measured <= 3.5e-2).
BOUND_OUTLIER_QUERY_BLOCK = 0.9
# One K token of 1e4 costs the precision of its key block and shifts the K mean by 1e4 / L per channel, widening
# every K block's INT8 range: measured 1.3e-1 (torch) / 1.5e-1 (Triton) at L=300; with 16-bit P.V 0.09-0.12 at
# L=300, 0.02-0.03 at L=1000 and 0.01 at L=4000 (within BOUND_SAGESLA).
BOUND_OUTLIER_KEY = 2e-1

# name -> (inputs transform, {region: bound of the quantized paths}); regions are in ``_regions``.
EXTREMES = {
    "x1e-4": (_scaled(1e-4), {"all": BOUND_SAGESLA}),
    "x1e3": (_scaled(1e3), {"all": BOUND_PEAKED}),
    "q-outlier-token": (
        _token_outlier(0),
        {"other query blocks": BOUND_SAGESLA, "the outlier's query block": BOUND_OUTLIER_QUERY_BLOCK},
    ),
    "k-outlier-token": (_token_outlier(1), {"all": BOUND_OUTLIER_KEY}),
    "v-outlier-token": (_token_outlier(2), {"all": BOUND_SAGESLA}),
    # End to end the attention averages V's rounding errors away, so even one V scale for all channels stays within
    # the bound here (3.7e-2); the per-channel scale itself is checked in tests/kernels/test_quant_ref.py.
    "v-outlier-channel": (_v_channel_outlier, {"other channels": BOUND_SAGESLA, "the outlier channel": BOUND_SAGESLA}),
    "constant-rows": (_constant_rows, {"all": BOUND_SAGESLA}),
    "equal-keys": (_equal_keys, {"all": BOUND_SAGESLA}),
    "zero-block": (_zero_block, {"all": BOUND_SAGESLA}),
}
# (backend, quantized, pv_precision)
PATHS = [pytest.param(*path, id=name) for name, *path in FORWARD_PATHS]
# Triton runs one head under the interpreter.
SHAPES = {"torch": (1, 2, 300, 64), "triton": (1, 1, 300, 64)}


def extreme_case(name: str, backend: str, quantized: bool, pv: str, dtype: torch.dtype, seed: int = 0):
    """(output, float64 truth) of one path on one extreme case, both [B, H, L, D]."""
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES[backend]
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    k = k + 0.5 * torch.randn(*shape[:2], 1, shape[3], generator=gen)
    q, k, v = (x.to(DEVICE, dtype) for x in EXTREMES[name][0](q, k, v))
    # The outlier channel is judged alone, so no linear branch (proj_l) mixes it into the others.
    w, b = None, None
    if name != "v-outlier-channel":
        d = shape[-1]
        w, b = (torch.randn(d, d, generator=gen) * 0.05).to(DEVICE), (torch.randn(d, generator=gen) * 0.05).to(DEVICE)
    opts = {"topk": 0.5, "quantized": quantized, "pv_precision": pv, "block_q": BLOCK, "block_k": BLOCK}
    o, lut = run_forward(backend, q, k, v, proj_weight=w, proj_bias=b, **opts)
    return o, sla_dense_reference(q, k, v, lut, BLOCK, BLOCK, w, b, dtype=torch.float64)


def _regions(name: str, o: torch.Tensor, truth: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The parts of the output that a case bounds separately: {region: (output part, truth part)}."""
    if name == "q-outlier-token":
        block = torch.zeros(o.shape[-2], dtype=torch.bool, device=o.device)
        block[SPOT // BLOCK * BLOCK : (SPOT // BLOCK + 1) * BLOCK] = True
        return {
            "other query blocks": (o[..., ~block, :], truth[..., ~block, :]),
            "the outlier's query block": (o[..., block, :], truth[..., block, :]),
        }
    if name == "v-outlier-channel":
        others = [c for c in range(o.shape[-1]) if c != 3]
        return {
            "other channels": (o[..., others], truth[..., others]),
            "the outlier channel": (o[..., 3], truth[..., 3]),
        }
    return {"all": (o, truth)}


@pytest.mark.usefixtures("gpu_nan_semantics")
@pytest.mark.parametrize("backend,quantized,pv", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(EXTREMES))
def test_extreme_inputs(name, backend, quantized, pv, dtype):
    o, truth = extreme_case(name, backend, quantized, pv, dtype)
    assert torch.isfinite(o).all()
    bounds = EXTREMES[name][1]
    for region, (part, part_truth) in _regions(name, o, truth).items():
        assert_close(f"{name} {backend} {pv}: {region}", part_truth, part, bounds[region] if quantized else BOUND_SLA)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_v_saturates_instead_of_overflowing(backend):
    """V scaled past the e4m3 range (a maximum given too small) clamps to +-448; e4m3fn has no Inf, a cast overflows
    to NaN."""
    v = torch.randn(1, 2, 100, 64, device=DEVICE)
    amax = v.abs().amax(dim=-2) * 0.25
    if backend == "torch":
        v_fp8 = quant_v_fp8_ref(v, amax)[0].float()
    else:
        v_fp8 = quant_v_fp8(v, amax, 128)[0][..., :64, :100].transpose(-1, -2).float()
    assert not v_fp8.isnan().any()
    assert v_fp8.abs().max() == FP8_MAX and (v_fp8.abs() == FP8_MAX).float().mean() > 0.1
