"""Reference linear branch against a float64 computation written out token by token."""

import pytest
import torch

from sagesla.kernels.block_select_ref import lut_to_mask, select_blocks_ref
from sagesla.kernels.linear_attn_ref import feature_map_ref, linear_attn_ref
from sagesla.kernels.quant_ref import pool_blocks_ref
from sagesla.testing import assert_close

TOL_FP32 = 1e-5


def _phi64(x, name):
    if name == "softmax":
        e = torch.exp(x - x.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)
    if name == "elu":
        return torch.where(x > 0, x + 1, torch.exp(x))
    return x.clamp_min(0)


def _linear64(q, k, v, name, w, b, keys_of_query):
    """o[t] = proj(phi(q_t) sum_c phi(k_c)^T v_c / (1e-5 + phi(q_t) . sum_c phi(k_c))), c over keys_of_query(t)."""
    q, k, v, w, b = (x.double() for x in (q, k, v, w, b))
    pq, pk = _phi64(q, name), _phi64(k, name)
    out = torch.empty_like(q)
    for t in range(q.shape[-2]):
        keys = keys_of_query(t)
        kv = torch.einsum("bhcd,bhce->bhde", pk[:, :, keys], v[:, :, keys])
        num = torch.einsum("bhd,bhde->bhe", pq[:, :, t], kv)
        den = 1e-5 + (pq[:, :, t] * pk[:, :, keys].sum(-2)).sum(-1, keepdim=True)
        out[:, :, t] = (num / den) @ w.t() + b
    return out


@pytest.mark.parametrize("name", ["softmax", "elu", "relu"])
def test_feature_maps(name):
    x = torch.randn(3, 70, dtype=torch.float64)
    torch.testing.assert_close(feature_map_ref(x, name).double(), _phi64(x, name), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["softmax", "elu", "relu"])
@pytest.mark.parametrize("length", [77, 130])
def test_scope_all(name, length):
    q, k, v = (torch.randn(1, 2, length, 64) for _ in range(3))
    w, b = torch.randn(64, 64) * 0.1, torch.randn(64) * 0.1
    ref = _linear64(q, k, v, name, w, b, lambda t: slice(None))
    assert_close(f"linear[{name}]", ref, linear_attn_ref(q, k, v, name, w, b), TOL_FP32)


@pytest.mark.parametrize("name", ["softmax", "elu"])
def test_scope_complement(name):
    length, bq, bk = 150, 32, 64
    q, k, v = (torch.randn(1, 2, length, 64) for _ in range(3))
    w, b = torch.randn(64, 64) * 0.1, torch.randn(64) * 0.1
    lut = select_blocks_ref(pool_blocks_ref(q, bq), pool_blocks_ref(k, bk), 0.34)
    mask = lut_to_mask(lut, 3)
    got = linear_attn_ref(q, k, v, name, w, b, scope="complement", block_mask=mask, block_q=bq, block_k=bk)
    # The complement differs per head, so compare head by head.
    for h in range(2):

        def keys_of_query(t, h=h):
            blocks = (~mask[0, h, t // bq]).nonzero().flatten().tolist()
            return [c for j in blocks for c in range(j * bk, min((j + 1) * bk, length))]

        ref = _linear64(q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], name, w, b, keys_of_query)
        assert_close(f"complement[{name}] head {h}", ref, got[:, h : h + 1], TOL_FP32)


def test_relu_zero_denominator_gives_zero_not_nan():
    q = -torch.rand(1, 1, 10, 64)  # relu(q) == 0
    k, v = torch.randn(1, 1, 10, 64), torch.randn(1, 1, 10, 64)
    out = linear_attn_ref(q, k, v, "relu", torch.eye(64), None)
    assert torch.equal(out, torch.zeros_like(out))
