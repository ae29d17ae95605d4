"""Exact keys: extra keys every query attends inside the sparse softmax, against float64 dense attention over
``[selected keys; valid extra keys]``, on the torch reference and the Triton kernels (interpreter on CPU)."""

import logging
from types import SimpleNamespace

import pytest
import torch

import sagesla
from sagesla import metrics, ops
from sagesla.kernels import exact_keys_ref
from sagesla.kernels.block_select_ref import lut_to_mask
from sagesla.kernels.exact_keys_ref import exact_partials, merge_partials
from sagesla.kernels.linear_attn_ref import linear_attn_ref
from sagesla.kernels.sla_ref import sla_forward_ref
from sagesla.kernels.sparse_attn_ref import sparse_attn_ref
from sagesla.settings import SLASettings
from sagesla.testing import (
    BOUND_SAGESLA,
    TOL_KERNEL_FP8,
    TOL_PIPELINE_HALF,
    assert_close,
    dense_masked_attention,
    expand_block_mask,
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# fp32 math on the same (16-bit or fp32) inputs as the float64 truth.
TOL_FP32 = 1e-5
# Log-sum-exps in fp32 (absolute, natural log).
TOL_LSE = 1e-5
# The interpreter's numpy warns on the NaN the NaN tests compute with.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _mask(batch: int, tokens: int, kind: str) -> torch.Tensor | None:
    """None, or [B, T] bool: random with batch 0 all False ("ragged"), or all True."""
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(batch, tokens, dtype=torch.bool, device=DEVICE)
    mask = torch.rand(batch, tokens, device=DEVICE) < 0.6
    mask[0] = False
    return mask


def _dense_partial(q, k, v, mask, sm_scale):
    """Float64 softmax attention over the valid keys: (o, lse), o = 0 and lse = -inf where none is valid."""
    q, k, v = q.double(), k.double(), v.double()
    scores = (q @ k.transpose(-1, -2)) * sm_scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.softmax(scores, dim=-1).nan_to_num(nan=0.0)
    return p @ v, lse


@pytest.mark.parametrize("tokens", [0, 1, 13])
@pytest.mark.parametrize("kind", ["none", "ragged", "all"])
def test_exact_partials_match_float64(tokens, kind):
    q = torch.randn(2, 3, 37, 16, device=DEVICE)
    k, v = (torch.randn(2, 3, tokens, 16, device=DEVICE) for _ in range(2))
    mask = _mask(2, tokens, kind)
    o, lse = exact_partials(q, k, v, mask, 0.3)
    o_ref, lse_ref = _dense_partial(q, k, v, mask, 0.3)
    assert o.dtype == lse.dtype == torch.float32 and o.shape == q.shape and lse.shape == q.shape[:-1]
    assert torch.equal(lse == float("-inf"), lse_ref == float("-inf"))
    if tokens == 0 or kind == "ragged":
        assert not o[0].any() and (lse[0] == float("-inf")).all(), "rows without a valid key: o = 0, lse = -inf"
    finite = lse_ref.isfinite()
    torch.testing.assert_close(lse[finite], lse_ref[finite].float(), rtol=0, atol=TOL_LSE)
    if finite.any():
        assert_close("exact_partials", o_ref[finite], o[finite].double(), TOL_FP32)


def test_exact_partials_chunks_and_float64(monkeypatch):
    """One query per chunk gives the same result; float64 inputs compute in float64."""
    q = torch.randn(1, 2, 9, 8, device=DEVICE)
    k, v = (torch.randn(1, 2, 5, 8, device=DEVICE) for _ in range(2))
    mask = torch.tensor([[True, False, True, True, False]], device=DEVICE)
    whole = exact_partials(q, k, v, mask, 0.5)
    monkeypatch.setattr(exact_keys_ref, "_CHUNK_BYTES", 1)
    for a, b in zip(exact_partials(q, k, v, mask, 0.5), whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    o64, lse64 = exact_partials(q.double(), k.double(), v.double(), mask, 0.5)
    o_ref, lse_ref = _dense_partial(q, k, v, mask, 0.5)
    assert o64.dtype == lse64.dtype == torch.float64
    torch.testing.assert_close(o64, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse64, lse_ref, rtol=1e-12, atol=1e-12)


def test_masked_keys_take_no_part_whatever_their_values():
    q = torch.randn(1, 1, 6, 8, device=DEVICE)
    k, v = (torch.randn(1, 1, 4, 8, device=DEVICE) for _ in range(2))
    mask = torch.tensor([[True, False, True, False]], device=DEVICE)
    clean = exact_partials(q, k, v, mask, 0.4)
    k[..., 1, :], v[..., 3, :] = float("nan"), float("inf")
    for a, b in zip(exact_partials(q, k, v, mask, 0.4), clean, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("split", [0, 5, 11, 16], ids=lambda s: f"split{s}")
def test_merge_partials_is_the_softmax_over_the_union(split):
    """Keys split in two (either side possibly empty): merging the two partials gives dense attention over all."""
    q = torch.randn(2, 2, 21, 16, dtype=torch.float64, device=DEVICE) * 2
    k, v = (torch.randn(2, 2, 16, 16, dtype=torch.float64, device=DEVICE) for _ in range(2))
    mask = torch.rand(2, 16, device=DEVICE) < 0.7
    mask[1, :] = True
    a = exact_partials(q, k[..., :split, :], v[..., :split, :], mask[:, :split], 0.25)
    b = exact_partials(q, k[..., split:, :], v[..., split:, :], mask[:, split:], 0.25)
    o_ref, _ = _dense_partial(q, k, v, mask, 0.25)
    torch.testing.assert_close(merge_partials(*a, *b), o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merge_partials(*b, *a), o_ref, rtol=1e-12, atol=1e-12)


def test_merge_partials_empty_sides_and_nan():
    o_a, o_b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    lse_a, lse_b = torch.randn(2, 3), torch.full((2, 3), float("-inf"))
    assert torch.equal(merge_partials(o_a, lse_a, torch.zeros_like(o_b), lse_b), o_a), "an empty side adds nothing"
    assert not merge_partials(torch.zeros_like(o_a), lse_b, torch.zeros_like(o_b), lse_b).any(), "both empty: 0"
    # a far smaller lse: weight underflows to 0, yet its NaN reaches the output (no finite wrong value)
    o_b[0, 1, 2] = float("nan")
    merged = merge_partials(o_a, lse_a, o_b, lse_a - 1e4)
    assert merged[0, 1, 2].isnan() and merged.isnan().sum() == 1
    lse_nan = lse_a.clone()
    lse_nan[1, 0] = float("nan")
    assert merge_partials(o_a, lse_nan, o_b.nan_to_num(), lse_a).isnan().sum() == 4, "a NaN lse reaches its row"


@pytest.mark.parametrize("quantized", [False, True])
def test_sparse_references_return_the_lse(quantized):
    """lse of the references: natural log of sum exp over each row's selected keys; o unchanged."""
    from sagesla.kernels.constants import LOG2E
    from sagesla.kernels.quant_ref import quant_qk_ref
    from sagesla.kernels.sparse_attn_ref import sparse_attn_quant_ref

    q, k, v = (torch.randn(1, 2, 77, 32, device=DEVICE) for _ in range(3))
    lut = torch.tensor([[0, 2], [1, 2], [0, 1]], dtype=torch.int32, device=DEVICE).expand(1, 2, 3, 2)
    token_mask = expand_block_mask(lut_to_mask(lut, 3), 77, 32, 32)
    k_mean = k.mean(dim=-2, keepdim=True)
    if quantized:
        qk = quant_qk_ref(q, k, 32, 32, 32**-0.5 * LOG2E, k_mean)
        args = (qk.q_int8, qk.q_scale, qk.k_int8, qk.k_scale, v.half(), None, lut, 32, 32)
        o, lse = sparse_attn_quant_ref(*args, return_lse=True)
        assert torch.equal(o, sparse_attn_quant_ref(*args))
        k = k - k_mean  # the quantized scores are those of the smoothed K
    else:
        o, lse = sparse_attn_ref(q, k, v, lut, 32, 32, 32**-0.5, return_lse=True)
        assert torch.equal(o, sparse_attn_ref(q, k, v, lut, 32, 32, 32**-0.5))
    scores = (q.double() @ k.double().transpose(-1, -2)) * 32**-0.5
    lse_ref = torch.logsumexp(scores.masked_fill(~token_mask, float("-inf")), dim=-1)
    assert lse.shape == (1, 2, 77) and lse.dtype == torch.float32
    # INT8 Q and K: scores within about 1% of their magnitude
    torch.testing.assert_close(lse.double(), lse_ref, rtol=0, atol=0.05 if quantized else TOL_LSE)


def _joint_case(batch=2, heads=2, length=77, head_dim=64, tokens=13, dtype=torch.bfloat16):
    """q, k, v [B, H, L, D] with a shared offset on k; extra keys aligned with the queries (a large share of the
    attention) and their own offset; a [B, T] mask with batch 0's row all False."""
    q = torch.randn(batch, heads, length, head_dim, device=DEVICE)
    k = torch.randn(batch, heads, length, head_dim, device=DEVICE) + torch.randn(
        batch, heads, 1, head_dim, device=DEVICE
    )
    v = torch.randn(batch, heads, length, head_dim, device=DEVICE)
    k_x = torch.randn(batch, heads, tokens, head_dim, device=DEVICE) + 2 * q.mean(dim=-2, keepdim=True)
    v_x = torch.randn(batch, heads, tokens, head_dim, device=DEVICE) + 1.0
    mask = _mask(batch, tokens, "ragged")
    return [x.to(dtype) for x in (q, k, v, k_x, v_x)] + [mask]


def _dense_joint(q, k, v, k_x, v_x, mask, lut, bq, bk, proj_weight, proj_bias, sm_scale):
    """Float64 truth: one softmax over each query's selected keys and the valid extra keys, plus proj_l(o_l)."""
    length, tokens = q.shape[-2], k_x.shape[-2]
    selected = expand_block_mask(lut_to_mask(lut, -(-length // bk)), length, bq, bk)
    valid = torch.ones(q.shape[0], tokens, dtype=torch.bool, device=q.device) if mask is None else mask
    token_mask = torch.cat([selected, valid[:, None, None, :].expand(*selected.shape[:-1], tokens)], dim=-1)
    keys, values = torch.cat([k, k_x], dim=-2), torch.cat([v, v_x], dim=-2)
    o = dense_masked_attention(q, keys, values, token_mask, sm_scale=sm_scale, dtype=torch.float64)
    if proj_weight is None:
        return o
    leaves = (x.double() for x in (q, k, v))
    return o + linear_attn_ref(*leaves, "softmax", proj_weight.double(), proj_bias.double())


def _pipeline_kwargs(quantized, pv, topk, proj, head_dim, bq=32, bk=32):
    weight = bias = None
    if proj:
        weight = torch.randn(head_dim, head_dim, device=DEVICE) * 0.05
        bias = torch.randn(head_dim, device=DEVICE) * 0.05
    return {
        "topk": topk,
        "block_q": bq,
        "block_k": bk,
        "sm_scale": head_dim**-0.5,
        "quantized": quantized,
        "pv_precision": pv,
        "feature_map": "softmax",
        "linear_scope": "all",
        "proj_weight": weight,
        "proj_bias": bias,
    }


PATHS = [
    pytest.param(False, "half", TOL_FP32, id="sla"),
    pytest.param(True, "fp8", BOUND_SAGESLA, id="sagesla-fp8"),
    pytest.param(True, "half", BOUND_SAGESLA, id="sagesla-half"),
]


@pytest.mark.parametrize("quantized,pv,tol", PATHS)
@pytest.mark.parametrize("topk", [0.3, 1.0])
@pytest.mark.parametrize("proj", [False, True], ids=["sparse-only", "linear"])
def test_torch_pipeline_matches_float64_dense(quantized, pv, tol, topk, proj):
    """L = 77 in blocks of 32 (a ragged tail); the extra keys carry a large share of the attention."""
    q, k, v, k_x, v_x, mask = _joint_case()
    kwargs = _pipeline_kwargs(quantized, pv, topk, proj, q.shape[-1])
    out = torch.full(q.shape, float("nan"), device=DEVICE)
    lut = sla_forward_ref(q, k, v, out=out, exact=(k_x, v_x, mask), **kwargs)
    truth = _dense_joint(q, k, v, k_x, v_x, mask, lut, 32, 32, kwargs["proj_weight"], kwargs["proj_bias"], 0.125)
    assert_close(f"sla_forward_ref exact [{pv}, quantized={quantized}]", truth, out.double(), tol)
    without = torch.empty_like(out)
    sla_forward_ref(q, k, v, out=without, **kwargs)
    assert metrics.rel_l1(out[1], without[1]) > 0.1, "the extra keys must matter in this case"
    assert torch.equal(out[0], without[0]), "batch 0 masks every extra key"


def test_torch_pipeline_topk1_without_linear_is_dense_over_the_concatenated_keys():
    q, k, v, k_x, v_x, _ = _joint_case(batch=1, tokens=7, dtype=torch.float32)
    out = torch.empty_like(q)
    sla_forward_ref(q, k, v, out=out, exact=(k_x, v_x, None), **_pipeline_kwargs(False, "half", 1.0, False, 64))
    truth = dense_masked_attention(q, torch.cat([k, k_x], -2), torch.cat([v, v_x], -2), sm_scale=0.125)
    assert_close("dense over [k; k_x]", truth, out.double(), TOL_FP32)


def test_torch_reference_is_differentiable_through_the_extra_keys():
    """float64 gradcheck of the unquantized reference: q, k, v and the extra keys and values."""
    q, k, v = (torch.randn(1, 1, 20, 8, dtype=torch.float64, device=DEVICE, requires_grad=True) for _ in range(3))
    k_x, v_x = (torch.randn(1, 1, 5, 8, dtype=torch.float64, device=DEVICE, requires_grad=True) for _ in range(2))
    mask = torch.tensor([[True, False, True, True, True]], device=DEVICE)
    kwargs = _pipeline_kwargs(False, "half", 0.5, False, 8, bq=8, bk=8)

    def forward(q, k, v, k_x, v_x):
        out = torch.empty_like(q)
        sla_forward_ref(q, k, v, out=out, exact=(k_x, v_x, mask), **kwargs)
        return out

    assert torch.autograd.gradcheck(forward, (q, k, v, k_x, v_x), fast_mode=True)


def _sla_forward():
    from sagesla.kernels.sla import sla_forward

    return sla_forward


@pytest.mark.parametrize("pv,tol", [("fp8", TOL_KERNEL_FP8), ("half", TOL_PIPELINE_HALF)])
@pytest.mark.parametrize("proj", [False, True], ids=["sparse-only", "linear"])
def test_triton_pipeline_matches_reference(pv, tol, proj):
    """The kernel's epilogue merge against the torch pipeline, same inputs (L = 77: a masked tail query block)."""
    shape = (2, 1, 77) if not HAS_CUDA else (2, 4, 3001)
    q, k, v, k_x, v_x, mask = _joint_case(*shape)
    kwargs = _pipeline_kwargs(True, pv, 0.5, proj, q.shape[-1])
    out_ref, out_tri = torch.empty_like(q), torch.full_like(q, float("nan"))
    lut_ref = sla_forward_ref(q, k, v, out=out_ref, exact=(k_x, v_x, mask), **kwargs)
    lut_tri = _sla_forward()(q, k, v, out=out_tri, exact=(k_x, v_x, mask), **kwargs)
    # Pools summed in another order may swap two near-equal blocks; everything else must agree.
    assert (lut_tri == lut_ref).float().mean() > 0.99
    if torch.equal(lut_tri, lut_ref):
        assert_close(f"sla_forward exact [{pv}]", out_ref, out_tri, tol)


def test_triton_pipeline_without_exact_keys_is_unchanged():
    q, k, v, *_ = _joint_case(batch=1, length=70)
    kwargs = _pipeline_kwargs(True, "fp8", 0.5, True, q.shape[-1])
    outs = [torch.full_like(q, float("nan")) for _ in range(2)]
    _sla_forward()(q, k, v, out=outs[0], **kwargs)
    _sla_forward()(q, k, v, out=outs[1], exact=None, **kwargs)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_no_extra_keys_change_nothing(backend, layout):
    """T = 0 through the public API: bit for bit the call without exact keys."""
    q, k, v, k_x, v_x, mask = _joint_case(batch=1, length=70, tokens=0)
    if layout == "NHD":
        q, k, v, k_x, v_x = (x.transpose(1, 2) for x in (q, k, v, k_x, v_x))
    kwargs = {"topk": 0.5, "block_q": 32, "block_k": 32, "tensor_layout": layout, "backend": backend}
    with_none = sagesla.sparse_linear_attn(q, k, v, exact_kv=(k_x, v_x), exact_mask=mask[:1], **kwargs)
    assert torch.equal(with_none, sagesla.sparse_linear_attn(q, k, v, **kwargs))


@pytest.mark.parametrize("quantized", [False, True])
def test_public_api_nhd_and_module_match_the_pipeline(quantized):
    q, k, v, k_x, v_x, mask = _joint_case(batch=2, heads=2, length=70)
    kwargs = _pipeline_kwargs(quantized, "fp8", 0.5, False, q.shape[-1])
    out = torch.empty_like(q)
    sla_forward_ref(q, k, v, out=out, exact=(k_x, v_x, mask), **kwargs)
    nhd = [x.transpose(1, 2).contiguous() for x in (q, k, v, k_x, v_x)]
    o = sagesla.sparse_linear_attn(
        *nhd[:3], topk=0.5, quantized=quantized, block_q=32, block_k=32, tensor_layout="NHD", pv_precision="fp8",
        exact_kv=tuple(nhd[3:]), exact_mask=mask, backend="torch",
    )  # fmt: skip
    torch.testing.assert_close(o.transpose(1, 2), out)
    cls = sagesla.SageSparseLinearAttention if quantized else sagesla.SparseLinearAttention
    module = cls(64, 0.5, BLKQ=32, BLKK=32, backend="torch", **({"pv_precision": "fp8"} if quantized else {}))
    torch.testing.assert_close(module(q, k, v, exact_kv=(k_x, v_x), exact_mask=mask), out)


@pytest.mark.usefixtures("gpu_nan_semantics")
@pytest.mark.parametrize(
    "backend,quantized,pv",
    [
        pytest.param("torch", False, "half", id="torch-sla"),
        pytest.param("torch", True, "fp8", id="torch-fp8"),
        pytest.param("triton", True, "fp8", id="triton-fp8"),
        pytest.param("triton", True, "half", id="triton-half"),
    ],
)
@pytest.mark.parametrize("where", ["k_x", "v_x"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_extra_key_reaches_exactly_the_rows_dense_attention_says(backend, quantized, pv, where, bad):
    """A NaN / Inf in a valid extra key (batch 1, head 0) makes the rows of that head non-finite where dense attention
    over the joint keys is; the same value in a masked extra key (batch 0, all masked) changes nothing."""
    q, k, v, k_x, v_x, mask = _joint_case(batch=2, heads=2, length=70, tokens=5)
    mask[1] = True
    {"k_x": k_x, "v_x": v_x}[where][:, 0, 2, 7] = bad
    kwargs = _pipeline_kwargs(quantized, pv, 0.5, True, q.shape[-1])
    forward = sla_forward_ref if backend == "torch" else _sla_forward()
    out = torch.full(q.shape, float("nan"), device=DEVICE)
    lut = forward(q, k, v, out=out, exact=(k_x, v_x, mask), **kwargs)
    truth = _dense_joint(q, k, v, k_x, v_x, mask, lut, 32, 32, kwargs["proj_weight"], kwargs["proj_bias"], 0.125)
    dense_bad, ours_bad = ~truth.isfinite(), ~out.isfinite()
    # (an Inf key scores -inf for some queries, which then give it no weight)
    assert dense_bad[1, 0].any() and not dense_bad[0].any() and not dense_bad[:, 1].any()
    assert not (dense_bad & ~ours_bad).any(), "non-finite in dense attention, finite here"
    assert not ours_bad[0].any() and not ours_bad[:, 1].any(), "the masked key and the other head stay finite"
    clean = ~dense_bad
    assert_close("finite elements", truth[clean], out[clean].double(), TOL_FP32 if not quantized else BOUND_SAGESLA)


def test_triton_refuses_exact_keys_unquantized_and_auto_falls_back(caplog):
    q, k, v, k_x, v_x, mask = _joint_case(batch=1, length=64)
    call = {"topk": 0.5, "quantized": False, "exact_kv": (k_x, v_x), "exact_mask": mask}
    with pytest.raises(NotImplementedError, match=r"backend='triton' cannot serve this call: exact keys"):
        sagesla.sparse_linear_attn(q, k, v, backend="triton", **call)
    # On a CUDA tensor "auto" asks the Triton backend, which names the exact keys (logged once a process); quantized,
    # they are served.
    cuda_like = SimpleNamespace(device=torch.device("cuda"), shape=q.shape)
    sla = SLASettings(quantized=False, block_q=64, block_k=64)
    assert "exact keys" in ops.triton_unsupported_reason(cuda_like, sla, has_exact=True)
    assert ops.triton_unsupported_reason(cuda_like, sla) is None
    assert ops.triton_unsupported_reason(cuda_like, sla.replace(quantized=True), has_exact=True) is None
    with caplog.at_level(logging.INFO, logger="sagesla"):
        assert ops.resolve_backend(cuda_like, sla, has_exact=True) == "torch"
        assert torch.equal(
            sagesla.sparse_linear_attn(q, k, v, backend="auto", **call),
            sagesla.sparse_linear_attn(q, k, v, backend="torch", **call),
        )
    assert "backend='auto' uses the torch reference: exact keys" in caplog.text


def test_unquantized_training_reaches_the_extra_keys_and_quantized_refuses():
    q, k, v, k_x, v_x = (x.float() for x in _joint_case(batch=1)[:5])
    k_x.requires_grad_()
    v_x.requires_grad_()
    mask = torch.arange(13, device=DEVICE)[None] % 3 != 1
    o = sagesla.sparse_linear_attn(q, k, v, topk=0.5, quantized=False, exact_kv=(k_x, v_x), exact_mask=mask)
    o.square().sum().backward()
    for grad in (k_x.grad, v_x.grad):
        assert grad[..., mask[0], :].abs().sum() > 0
        assert not grad[..., ~mask[0], :].any(), "masked extra keys get no gradient"
    with pytest.raises(RuntimeError, match=r"exact_kv\[0\], exact_kv\[1\] require\(s\) grad"):
        sagesla.sparse_linear_attn(q, k, v, topk=0.5, exact_kv=(k_x, v_x))


Q = torch.randn(1, 2, 64, 16)
KX = torch.randn(1, 2, 5, 16)


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        ({"exact_mask": torch.ones(1, 5, dtype=torch.bool)}, ValueError, r"`exact_mask` was given without `exact_kv`"),
        ({"exact_kv": KX}, TypeError, r"`exact_kv` must be a \(k, v\) pair of torch.Tensor \[B, H, T, D\], got Tensor"),
        ({"exact_kv": (KX,)}, TypeError, r"`exact_kv` must be a \(k, v\) pair .*got tuple of length 1"),
        ({"exact_kv": (KX, KX.numpy())}, TypeError, r"`exact_kv\[1\]` must be a torch.Tensor \[B, H, T, D\], got nd"),
        ({"exact_kv": (KX.half(), KX)}, TypeError, r"`exact_kv\[0\]` must have the dtype of `q` \(torch.float32\)"),
        ({"exact_kv": (KX, KX.to("meta"))}, ValueError, r"`exact_kv\[1\]` must be on the device of `q` \(cpu\)"),
        (
            {"exact_kv": (KX[:, :1], KX)},
            ValueError,
            r"`exact_kv\[0\]` must have shape \[B, H, T, D\] for tensor_layout='HND', with the B, H, D of `q` "
            r"\(1, 2, 64, 16\), got \(1, 1, 5, 16\)",
        ),
        ({"exact_kv": (KX, KX[..., :8])}, ValueError, r"`exact_kv\[1\]` must have shape .*got \(1, 2, 5, 8\)"),
        ({"exact_kv": (KX[0], KX)}, ValueError, r"`exact_kv\[0\]` must have shape .*got \(2, 5, 16\)"),
        ({"exact_kv": (KX, KX[:, :, :4])}, ValueError, r"`exact_kv\[1\]` must have the shape of `exact_kv\[0\]`"),
        (
            {"exact_kv": (KX, KX), "q": Q.transpose(1, 2), "tensor_layout": "NHD"},
            ValueError,
            r"`exact_kv\[0\]` must have shape \[B, T, H, D\] for tensor_layout='NHD'.*got \(1, 2, 5, 16\)",
        ),
        (
            {"exact_kv": (KX, KX), "exact_mask": torch.ones(1, 5)},
            TypeError,
            r"`exact_mask` must be None or a torch.bool tensor \[B, T\] = \(1, 5\) .*got torch.float32 tensor",
        ),
        ({"exact_kv": (KX, KX), "exact_mask": [True] * 5}, TypeError, r"`exact_mask` must be None or a torch.bool"),
        (
            {"exact_kv": (KX, KX), "exact_mask": torch.ones(1, 4, dtype=torch.bool)},
            ValueError,
            r"`exact_mask` must have shape \[B, T\] = \(1, 5\), got \(1, 4\)",
        ),
        (
            {"exact_kv": (KX, KX), "exact_mask": torch.ones(1, 5, dtype=torch.bool, device="meta")},
            ValueError,
            r"`exact_mask` must be on the device of `q` \(cpu\), got meta",
        ),
    ],
    ids=lambda x: None,
)
def test_bad_exact_keys(overrides, error, message):
    args = {"q": Q, "topk": 0.5, "backend": "torch"}
    args.update(overrides)
    q = args.pop("q")
    with pytest.raises(error, match=message):
        sagesla.sparse_linear_attn(q, q, q, **args)
