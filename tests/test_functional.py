"""The whole forward (torch backend) against float64 ground truth with the same block selection."""

import pytest
import torch

import sagesla
from sagesla import metrics
from sagesla.kernels.block_select_ref import lut_to_mask
from sagesla.kernels.linear_attn_ref import linear_attn_ref
from sagesla.kernels.sla_ref import sla_forward_ref
from sagesla.synthetic import video_like_qkv
from sagesla.testing import (
    BOUND_SAGESLA,
    BOUND_SLA,
    assert_close,
    dense_masked_attention,
    expand_block_mask,
    run_forward,
    sla_dense_reference,
)


def _gaussian(length, head_dim, heads=2):
    q = torch.randn(1, heads, length, head_dim)
    k = torch.randn(1, heads, length, head_dim) + 0.5 * torch.randn(1, heads, 1, head_dim)
    return q, k, torch.randn(1, heads, length, head_dim)


def _video(length, head_dim, heads=2):
    q, k, v = video_like_qkv(1, heads, 4, 16, length // 64, head_dim)
    return q, k, v


def _run(q, k, v, *, quantized, topk, bq, bk, feature_map="softmax", pv="fp8", proj_std=0.02):
    """(bf16 output of the torch pipeline on bf16-rounded inputs, float64 truth from the unrounded inputs)."""
    d = q.shape[-1]
    w, b = torch.randn(d, d) * proj_std, torch.randn(d) * proj_std
    o, lut = run_forward(
        "torch",
        *(x.to(torch.bfloat16) for x in (q, k, v)),
        topk=topk,
        quantized=quantized,
        pv_precision=pv,
        block_q=bq,
        block_k=bk,
        feature_map=feature_map,
        proj_weight=w,
        proj_bias=b,
    )
    return o, sla_dense_reference(q, k, v, lut, bq, bk, w, b, feature_map, dtype=torch.float64)


SHAPES = [
    pytest.param(77, 64, id="L77-D64"),
    pytest.param(1000, 128, id="L1000-D128"),
    pytest.param(1024, 64, id="L1024-D64"),
]


@pytest.mark.parametrize("inputs", [_gaussian, _video], ids=["gaussian", "video"])
@pytest.mark.parametrize("length,head_dim", SHAPES)
@pytest.mark.parametrize("topk", [0.05, 0.25, 1.0])
def test_unquantized_bf16_vs_float64(inputs, length, head_dim, topk):
    o, ref = _run(*inputs(length, head_dim), quantized=False, topk=topk, bq=64, bk=64)
    assert_close("SLA bf16", ref, o, BOUND_SLA)


@pytest.mark.parametrize("inputs", [_gaussian, _video], ids=["gaussian", "video"])
@pytest.mark.parametrize("length,head_dim", SHAPES)
@pytest.mark.parametrize("topk", [0.05, 0.25, 1.0])
@pytest.mark.parametrize("pv", ["fp8", "half"])
def test_quantized_vs_float64(inputs, length, head_dim, topk, pv):
    o, ref = _run(*inputs(length, head_dim), quantized=True, topk=topk, bq=64, bk=128, pv=pv)
    assert_close(f"SageSLA pv={pv}", ref, o, BOUND_SAGESLA)


@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
def test_feature_maps_with_strong_linear_branch(feature_map):
    o, ref = _run(*_gaussian(200, 64), quantized=True, topk=0.3, bq=64, bk=64, feature_map=feature_map, proj_std=0.3)
    assert_close(f"SageSLA {feature_map}", ref, o, BOUND_SAGESLA)


@pytest.mark.parametrize("quantized", [True, False])
def test_nhd_layout_equals_hnd(quantized):
    q, k, v = _gaussian(150, 64)
    hnd = sagesla.sparse_linear_attn(q, k, v, topk=0.5, quantized=quantized, backend="torch")
    nhd = sagesla.sparse_linear_attn(
        *(x.transpose(1, 2).contiguous() for x in (q, k, v)),
        topk=0.5,
        quantized=quantized,
        tensor_layout="NHD",
        backend="torch",
    )
    assert nhd.shape == (1, 150, 2, 64) and nhd.is_contiguous()
    torch.testing.assert_close(nhd.transpose(1, 2), hnd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_dtype_and_sparsity(dtype):
    q, k, v = (x.to(dtype) for x in _gaussian(640, 64))
    o, sparsity = sagesla.sparse_linear_attn(q, k, v, topk=0.2, block_q=64, block_k=64, return_sparsity=True)
    assert o.dtype == dtype and o.shape == q.shape
    assert sparsity == pytest.approx(1 - 2 / 10)


def test_length_below_one_block():
    q, k, v = _gaussian(5, 64)
    o = sagesla.sparse_linear_attn(q, k, v, topk=0.05, backend="torch")
    assert_close("L=5", dense_masked_attention(q, k, v), o, BOUND_SAGESLA)


def test_empty_batch():
    q = torch.randn(0, 2, 64, 64)
    assert sagesla.sparse_linear_attn(q, q, q, topk=0.5).shape == q.shape


def test_sm_scale_is_used():
    q, k, v = _gaussian(256, 64)
    default = sagesla.sparse_linear_attn(q, k, v, topk=1.0, quantized=False)
    explicit = sagesla.sparse_linear_attn(q, k, v, topk=1.0, quantized=False, sm_scale=64**-0.5)
    sharper = sagesla.sparse_linear_attn(q, k, v, topk=1.0, quantized=False, sm_scale=0.5)
    torch.testing.assert_close(default, explicit)
    assert metrics.rel_l1(sharper, default) > 0.1
    assert_close("sm_scale=0.5", dense_masked_attention(q, k, v, sm_scale=0.5), sharper, BOUND_SLA)


def _float64_sla(q, k, v, lut, bq, bk, w, b, scope):
    """Ground truth in float64 for a given selection: dense masked softmax attention plus proj_l(linear branch)."""
    length = q.shape[-2]
    mask = lut_to_mask(lut, -(-length // bk))
    o = dense_masked_attention(q, k, v, expand_block_mask(mask, length, bq, bk))
    q, k, v, w, b = (x.double() for x in (q, k, v, w, b))
    return o + linear_attn_ref(q, k, v, "softmax", w, b, scope=scope, block_mask=mask, block_q=bq, block_k=bk)


def _grads(fn, inputs, grad):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    (out.double() * grad).sum().backward()
    return out.detach(), [x.grad for x in leaves]


# bf16 compute against float64 with the same selection: the forward within BOUND_SLA (measured 2.6e-3), and for
# gradients the measured rel-L1 (dq 4.1e-3, dk 4.0e-3, dv 3.2e-3, dW 2.1e-3, db 1.2e-7) with a margin.
TOL_GRAD_BF16 = 1.5e-2


@pytest.mark.parametrize("scope", ["all", "complement"])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_unquantized_gradients_vs_float64(scope, layout):
    """Gradients flow through the public API (torch backend) to q, k, v and proj_l, matching float64 autograd."""
    q, k, v = _gaussian(200, 64)
    w, b = torch.randn(64, 64) * 0.1, torch.randn(64) * 0.1
    grad = torch.randn(q.shape, dtype=torch.float64)
    bf = [x.to(torch.bfloat16) for x in (q, k, v)]
    lut = sla_forward_ref(
        *bf,
        topk=0.5,
        block_q=64,
        block_k=64,
        sm_scale=0.125,
        quantized=False,
        pv_precision="half",
        feature_map="softmax",
        linear_scope=scope,
        proj_weight=w,
        proj_bias=b,
        out=torch.empty(q.shape),
    )

    def api(q, k, v, w, b):
        if layout == "NHD":
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        o = sagesla.sparse_linear_attn(
            q,
            k,
            v,
            topk=0.5,
            quantized=False,
            proj_weight=w,
            proj_bias=b,
            linear_scope=scope,
            tensor_layout=layout,
            backend="torch",
        )
        return o if layout == "HND" else o.transpose(1, 2)

    out, grads = _grads(api, (q, k, v, w, b), grad)
    ref_out, ref_grads = _grads(lambda *x: _float64_sla(*x[:3], lut, 64, 64, *x[3:], scope), (q, k, v, w, b), grad)
    assert_close("out", ref_out, out.double(), BOUND_SLA)
    for name, r, t in zip(("dq", "dk", "dv", "dW", "db"), ref_grads, grads, strict=True):
        assert t.dtype == torch.float32
        assert_close(name, r, t.double(), TOL_GRAD_BF16)


# Triton kernels (under the interpreter on CPU) against the torch pipeline with the same selection; measured
# rel-L1 out <= 3.1e-3, dq/dk/dv <= 1.03e-2, dW <= 9.7e-3 (bf16 roundings in other places; the interpreter
# truncates to bf16).
TOL_TRITON_VS_TORCH = 2e-2


@pytest.mark.parametrize("scope", ["all", "complement"])
def test_triton_pipeline_gradients_match_torch_pipeline(scope):
    from sagesla.kernels.sla_train import sla_train_forward

    q, k, v = (x.to(torch.bfloat16) for x in _gaussian(150, 64))
    w, b = torch.randn(64, 64) * 0.1, torch.randn(64) * 0.1
    grad = torch.randn(q.shape, dtype=torch.float64)
    kwargs = {"topk": 0.5, "block_q": 64, "block_k": 64, "sm_scale": 0.125, "quantized": False}
    kwargs |= {"pv_precision": "half", "feature_map": "softmax", "linear_scope": scope}
    luts = []

    def run(forward):
        def fn(q, k, v, w, b):
            out = torch.empty(q.shape)
            luts.append(forward(q, k, v, **kwargs, proj_weight=w, proj_bias=b, out=out))
            return out

        return _grads(fn, (q, k, v, w, b), grad)

    ref, tri = run(sla_forward_ref), run(sla_train_forward)
    assert torch.equal(luts[0], luts[1])
    assert_close("out", ref[0], tri[0], TOL_TRITON_VS_TORCH)
    for name, r, t in zip(("dq", "dk", "dv", "dW", "db"), ref[1], tri[1], strict=True):
        assert_close(name, r.float(), t.float(), TOL_TRITON_VS_TORCH)


def test_triton_backend_serves_training_through_the_api():
    """backend="triton" (interpreter here) with fp32 NHD inputs: fp32 output in NHD, fp32 gradients."""
    q, k, v = (torch.randn(1, 100, 2, 64, requires_grad=True) for _ in range(3))
    w = torch.zeros(64, 64, requires_grad=True)
    o = sagesla.sparse_linear_attn(
        q, k, v, topk=0.5, quantized=False, proj_weight=w, tensor_layout="NHD", backend="triton"
    )
    assert o.dtype == torch.float32 and o.shape == q.shape and o.grad_fn is not None
    o.square().sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (q, k, v, w))
