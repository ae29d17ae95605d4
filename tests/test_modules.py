"""The nn.Module forms: thu-ml compatibility, state dict, proj_l semantics, dtypes."""

import pytest
import torch

import sagesla
from sagesla.testing import assert_close, dense_masked_attention

MODULES = [sagesla.SparseLinearAttention, sagesla.SageSparseLinearAttention]


@pytest.mark.parametrize("cls", MODULES)
def test_thu_ml_positional_constructor_and_state_dict(cls):
    attn = cls(64, 0.1, "elu", 64, 64, False, True)
    assert attn.feature_map == "elu" and attn.BLKQ == 64 and attn.dtype == torch.float16
    state = attn.state_dict()
    assert sorted(state) == ["proj_l.bias", "proj_l.weight"]
    assert state["proj_l.weight"].dtype == torch.float32 and state["proj_l.weight"].shape == (64, 64)
    assert not state["proj_l.weight"].any() and not state["proj_l.bias"].any()


def test_sage_module_accepts_block_sizes_unlike_the_reference():
    attn = sagesla.SageSparseLinearAttention(64, 0.1, BLKQ=64, BLKK=128)
    assert (attn.BLKQ, attn.BLKK) == (64, 128)
    assert "blocks=64x128" in repr(attn)
    assert "blocks=per-arch" in repr(sagesla.SageSparseLinearAttention(64, 0.1))


@pytest.mark.parametrize("cls", MODULES)
def test_zero_proj_l_gives_pure_sparse_attention(cls):
    q, k, v = (torch.randn(1, 2, 128, 64) for _ in range(3))
    attn = cls(64, 1.0, BLKQ=64, BLKK=64)
    o, sparsity = attn(q, k, v, return_sparsity=True)
    assert sparsity == 0.0 and o.dtype == torch.float32
    assert_close(cls.__name__, dense_masked_attention(q, k, v), o, 5e-2 if attn.quantized else 1e-2)


@pytest.mark.parametrize("cls", MODULES)
def test_loaded_proj_l_changes_output_and_gradients_reach_it(cls):
    q, k, v = (torch.randn(1, 2, 128, 64) for _ in range(3))
    attn = cls(64, 0.5, BLKQ=64, BLKK=64)
    base = attn(q, k, v)
    attn.load_state_dict({"proj_l.weight": torch.eye(64), "proj_l.bias": torch.zeros(64)})
    out = attn(q, k, v)
    assert (out - base).abs().max() > 1e-2
    out.sum().backward()
    assert attn.proj_l.weight.grad is not None and attn.proj_l.weight.grad.abs().sum() > 0


def test_nhd_module_and_bf16_io():
    q, k, v = (torch.randn(2, 96, 3, 64, dtype=torch.bfloat16) for _ in range(3))
    attn = sagesla.SageSparseLinearAttention(64, 0.5, tensor_layout="NHD")
    o = attn(q, k, v)
    assert o.shape == q.shape and o.dtype == torch.bfloat16


def test_zero_proj_l_skips_the_linear_branch_until_weights_change(monkeypatch):
    import sagesla.modules as modules

    seen = []
    real = modules.sparse_linear_attn

    def spy(*args, **kwargs):
        seen.append(kwargs["proj_weight"] is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(modules, "sparse_linear_attn", spy)
    q, k, v = (torch.randn(1, 2, 128, 64) for _ in range(3))
    attn = sagesla.SageSparseLinearAttention(64, 0.5)
    with torch.no_grad():
        skipped = attn(q, k, v)
        attn.load_state_dict({"proj_l.weight": torch.eye(64), "proj_l.bias": torch.zeros(64)})
        with_linear = attn(q, k, v)
        attn.proj_l.weight.zero_()
        skipped_again = attn(q, k, v)
    trained = attn(q, k, v)  # gradients enabled: the branch runs so proj_l can learn
    assert seen == [False, True, False, True]
    assert (with_linear - skipped).abs().max() > 1e-2
    torch.testing.assert_close(skipped_again, skipped)
    torch.testing.assert_close(trained, skipped)
