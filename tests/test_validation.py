"""Every bad input raises a clear error naming the argument, the value and what is accepted."""

import logging
from types import SimpleNamespace

import pytest
import torch

import sagesla
from sagesla import ops
from sagesla.settings import SLASettings

Q = torch.randn(1, 2, 64, 64)


def call(**overrides):
    args = {"q": Q, "k": Q, "v": Q, "topk": 0.5, "backend": "torch"}
    args.update(overrides)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return sagesla.sparse_linear_attn(q, k, v, **args)


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        ({"q": torch.randn(2, 64, 64)}, ValueError, r"`q` must have shape \[B, H, L, D\] .*got \(2, 64, 64\)"),
        ({"q": torch.randn(1, 64, 64), "tensor_layout": "NHD"}, ValueError, r"\[B, L, H, D\] for tensor_layout='NHD'"),
        ({"k": torch.randn(1, 2, 63, 64)}, ValueError, r"`k` must have the shape of `q` \(1, 2, 64, 64\).*63"),
        ({"v": torch.randn(1, 3, 64, 64)}, ValueError, r"`v` must have the shape of `q`"),
        ({"k": Q.half()}, TypeError, r"`k` must have the dtype of `q` \(torch.float32\), got torch.float16"),
        ({"q": Q.int(), "k": Q.int(), "v": Q.int()}, TypeError, r"`q` must have dtype float16, bfloat16 or float32"),
        ({"v": Q.double()}, TypeError, r"`v` must have dtype float16, bfloat16 or float32, got torch.float64"),
        ({"q": Q.numpy()}, TypeError, r"`q` must be a torch.Tensor"),
        ({"k": Q.to("meta")}, ValueError, r"`k` must be on the device of `q` \(cpu\), got meta"),
        ({"topk": 0.0}, ValueError, r"`topk` must be in \(0, 1\].*got 0.0"),
        ({"topk": 1.5}, ValueError, r"`topk` must be in \(0, 1\].*got 1.5"),
        ({"topk": -0.1}, ValueError, r"`topk` must be in \(0, 1\]"),
        ({"topk": "0.1"}, TypeError, r"`topk` must be a float in \(0, 1\], got str"),
        ({"topk": True}, TypeError, r"`topk` must be a float"),
        (
            {"feature_map": "hedgehog"},
            ValueError,
            r"`feature_map` must be one of \('softmax', 'elu', 'relu'\), got 'hed",
        ),
        ({"tensor_layout": "BHLD"}, ValueError, r"`tensor_layout` must be one of \('HND', 'NHD'\), got 'BHLD'"),
        ({"linear_scope": "marginal"}, ValueError, r"`linear_scope` must be one of \('all', 'complement'\)"),
        ({"backend": "cuda"}, ValueError, r"`backend` must be one of \('auto', 'torch', 'triton'\), got 'cuda'"),
        ({"pv_precision": "fp4"}, ValueError, r"`pv_precision` must be one of"),
        ({"compute_dtype": torch.float32}, ValueError, r"`compute_dtype` must be one of"),
        ({"block_q": 0}, ValueError, r"`block_q` must be a positive int .*got 0"),
        ({"block_k": 64.0}, ValueError, r"`block_k` must be a positive int .*got 64.0"),
        ({"sm_scale": -1.0}, ValueError, r"`sm_scale` must be positive, got -1.0"),
        ({"sm_scale": float("nan")}, ValueError, r"`sm_scale` must be a finite positive float"),
        ({"proj_weight": torch.randn(64, 32)}, ValueError, r"`proj_weight` must have shape \(64, 64\).*got \(64, 32\)"),
        ({"proj_weight": Q[0, 0], "proj_bias": torch.randn(32)}, ValueError, r"`proj_bias` must have shape \(64,\)"),
        ({"proj_bias": torch.randn(64)}, ValueError, r"`proj_bias` was given without `proj_weight`"),
        ({"proj_weight": torch.ones(64, 64, dtype=torch.int64)}, TypeError, r"`proj_weight` must be a float32, float1"),
        (
            {"proj_weight": torch.ones(64, 64).double()},
            TypeError,
            r"`proj_weight` must be a float32.*got torch.float64",
        ),
        ({"proj_weight": torch.ones(64, 64, device="meta")}, ValueError, r"`proj_weight` is a meta tensor"),
        ({"q": Q.to("meta"), "k": Q.to("meta"), "v": Q.to("meta")}, ValueError, r"`q` is a meta tensor \(shape only"),
        ({"q": Q[..., :0], "k": Q[..., :0], "v": Q[..., :0]}, ValueError, r"`q` must have a head dim D >= 1 .*0\)"),
        ({"quantized": None}, TypeError, r"`quantized` must be a bool, got NoneType None"),
        ({"quantized": "no"}, TypeError, r"`quantized` must be a bool, got str 'no'"),
        ({"return_sparsity": 1}, TypeError, r"`return_sparsity` must be a bool, got int 1"),
        ({"check_inputs": "yes"}, TypeError, r"`check_inputs` must be a bool"),
    ],
    ids=lambda x: None,
)
def test_bad_input(overrides, error, message):
    with pytest.raises(error, match=message):
        call(**overrides)


def test_triton_forced_but_unavailable_raises_not_implemented():
    with pytest.raises(NotImplementedError, match="backend='triton' cannot serve this call"):
        call(backend="triton", q=torch.randn(1, 2, 64, 300), k=torch.randn(1, 2, 64, 300), v=torch.randn(1, 2, 64, 300))


def test_auto_on_cuda_falls_back_to_torch_and_logs_why(monkeypatch, caplog):
    """On a CUDA tensor the Triton kernels cannot serve, "auto" runs the torch reference and logs the reason."""
    monkeypatch.setattr(ops, "triton_unsupported_reason", lambda *args, **kwargs: "head_dim 320 > 256 (test)")
    cuda_like = SimpleNamespace(device=torch.device("cuda"))
    with caplog.at_level(logging.INFO, logger="sagesla"):
        assert ops.resolve_backend(cuda_like, SLASettings(block_q=64, block_k=128, pv_precision="fp8")) == "torch"
    assert "backend='auto' uses the torch reference: head_dim 320 > 256 (test)" in caplog.text


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"head_dim": 0, "topk": 0.1}, ValueError, r"`head_dim` must be a positive int, got 0"),
        ({"head_dim": 64, "topk": 2}, ValueError, r"`topk` must be in \(0, 1\]"),
        ({"head_dim": 64, "topk": 0.1, "feature_map": "cosine"}, ValueError, r"`feature_map` must be one of"),
        ({"head_dim": 64, "topk": 0.1, "BLKQ": -64}, ValueError, r"`BLKQ` must be a positive int"),
        ({"head_dim": 64, "topk": 0.1, "backend": "cudnn"}, ValueError, r"`backend` must be one of"),
    ],
)
@pytest.mark.parametrize("cls", [sagesla.SparseLinearAttention, sagesla.SageSparseLinearAttention])
def test_bad_module_arguments(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls(**kwargs)


def test_module_head_dim_mismatch():
    attn = sagesla.SageSparseLinearAttention(128, 0.1)
    with pytest.raises(ValueError, match=r"`q` must have head_dim 128 in its last dim, got shape \(1, 2, 64, 64\)"):
        attn(Q, Q, Q)
