"""NaN / Inf inputs: the policy of ``sparse_linear_attn`` (docs/math.md) on every backend, path and layout.

Unchecked, an output element is non-finite wherever the same SLA computed densely in float64 (same inputs, same
block selection: with topk=1 that is full softmax attention plus the linear branch) is non-finite, and finite
elements are right. ``check_inputs=True`` raises instead. Triton runs under the interpreter on CPU, with the GPU's
NaN-dropping min / max (``gpu_nan_semantics``), so a kernel that turns NaN into a finite value fails here too.
"""

import pytest
import torch

import sagesla
from sagesla.testing import BOUND_SAGESLA, BOUND_SLA, FORWARD_PATHS, assert_close, run_forward, sla_dense_reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# (backend, quantized, pv_precision)
PATHS = [pytest.param(*path, id=name) for name, *path in FORWARD_PATHS]
# Head 1, token 70 (in the 36-row tail block of query and key blocks of 64), channel 5.
SHAPE, SPOT = (1, 2, 100, 64), (0, 1, 70, 5)
# The interpreter's numpy warns on the NaN it is made to compute with.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _inputs(where: str, bad: float, layout: str) -> list[torch.Tensor]:
    q, k, v = (torch.randn(SHAPE, device=DEVICE) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][SPOT] = bad
    return [x.to(torch.bfloat16) if layout == "HND" else x.to(torch.bfloat16).transpose(1, 2) for x in (q, k, v)]


@pytest.mark.usefixtures("gpu_nan_semantics")
@pytest.mark.parametrize("backend,quantized,pv", PATHS)
# The linear branch with relu, whose max(x, 0) would drop NaN on the GPU; an all-zero proj_l weight, whose product
# the kernels skip (0 * NaN is still NaN).
@pytest.mark.parametrize(
    "layout,proj,feature",
    [("HND", None, "softmax"), ("NHD", "random", "relu"), ("HND", "zero", "elu")],
    ids=["HND-sparse-only", "NHD-linear", "HND-zero-proj"],
)
@pytest.mark.parametrize("topk", [1.0, 0.5])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_where_dense_is(backend, quantized, pv, layout, proj, feature, topk, where, bad):
    inputs = _inputs(where, bad, layout)
    d = SHAPE[-1]
    w, b = (torch.randn(d, d, device=DEVICE) * 0.05, torch.randn(d, device=DEVICE) * 0.05) if proj else (None, None)
    if proj == "zero":
        w.zero_()
    o, lut = run_forward(
        backend, *inputs, topk=topk, tensor_layout=layout, quantized=quantized, pv_precision=pv, feature_map=feature,
        proj_weight=w, proj_bias=b,
    )  # fmt: skip
    hnd = [x if layout == "HND" else x.transpose(1, 2) for x in (*inputs, o)]
    truth = sla_dense_reference(*hnd[:3], lut, 64, 64, w, b, feature, dtype=torch.float64)
    dense_bad, ours_bad = ~torch.isfinite(truth), ~torch.isfinite(hnd[3])
    if topk == 1.0:
        assert dense_bad.any()
    missed = dense_bad & ~ours_bad
    assert not missed.any(), f"{int(missed.sum())} element(s) non-finite in dense attention came out finite"
    clean = ~ours_bad & ~dense_bad
    assert clean.any(), "the other head must stay finite"
    assert_close("finite elements", truth[clean], hnd[3][clean], BOUND_SAGESLA if quantized else BOUND_SLA)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_check_inputs_raises(backend, layout, where):
    inputs = _inputs(where, float("inf"), layout)
    with pytest.raises(ValueError, match=f"`{where}` holds 1 NaN/Inf value"):
        sagesla.sparse_linear_attn(*inputs, topk=0.5, tensor_layout=layout, backend=backend, check_inputs=True)
