"""Reference block selection against a direct float64 computation."""

import math

import pytest
import torch

from sagesla.kernels.block_select_ref import lut_to_mask, num_selected_blocks, select_blocks_ref
from sagesla.kernels.quant_ref import pool_blocks_ref


@pytest.mark.parametrize(
    "topk,nk,want", [(0.05, 256, 12), (0.1, 30, 3), (0.01, 10, 1), (1.0, 7, 7), (0.5, 1, 1), (0.2, 26, 5)]
)
def test_num_selected_blocks(topk, nk, want):
    assert num_selected_blocks(topk, nk) == want


@pytest.mark.parametrize("length", [77, 256, 1000])
@pytest.mark.parametrize("topk", [0.01, 0.3, 1.0])
def test_selection_matches_float64_ranking(length, topk):
    bq, bk = 32, 64
    q = torch.randn(2, 2, length, 64)
    k = torch.randn(2, 2, length, 64) + 1.0
    ks = k - k.mean(dim=-2, keepdim=True)
    lut = select_blocks_ref(pool_blocks_ref(q, bq), pool_blocks_ref(ks, bk), topk)
    nq, nk = math.ceil(length / bq), math.ceil(length / bk)
    selected = max(1, int(topk * nk))
    assert lut.shape == (2, 2, nq, selected) and lut.dtype == torch.int32
    assert (lut.diff(dim=-1) > 0).all(), "indices must be distinct and ascending"
    qd, kd = q.double(), ks.double()
    for i in range(nq):
        pq = qd[:, :, i * bq : (i + 1) * bq].mean(dim=-2)
        pk = torch.stack([kd[:, :, j * bk : (j + 1) * bk].mean(-2) for j in range(nk)])
        scores = torch.einsum("bhd,jbhd->bhj", pq, pk)
        chosen = scores.gather(-1, lut[:, :, i].long())
        # Every chosen block scores at least as high as every block left out (ties aside).
        left = scores.masked_fill(lut_to_mask(lut[:, :, i : i + 1], nk)[:, :, 0], float("-inf"))
        assert (chosen.amin(-1) >= left.amax(-1) - 1e-9).all()


def test_smoothing_does_not_change_selection():
    q, k = torch.randn(1, 2, 512, 64), torch.randn(1, 2, 512, 64)
    raw = select_blocks_ref(pool_blocks_ref(q, 64), pool_blocks_ref(k, 64), 0.25)
    smooth = select_blocks_ref(pool_blocks_ref(q, 64), pool_blocks_ref(k - k.mean(-2, keepdim=True), 64), 0.25)
    assert torch.equal(raw, smooth)


def test_nan_scores_rank_last():
    q_pool = torch.randn(1, 1, 2, 8)
    k_pool = torch.randn(1, 1, 4, 8)
    k_pool[..., 2, :] = float("nan")
    lut = select_blocks_ref(q_pool, k_pool, 0.5)
    assert not (lut == 2).any()


def test_lut_to_mask():
    lut = torch.tensor([[[[0, 2], [1, 3]]]], dtype=torch.int32)
    mask = lut_to_mask(lut, 4)
    assert mask.tolist() == [[[[True, False, True, False], [False, True, False, True]]]]


def test_ties_go_to_the_lowest_index():
    """Equal scores (a zero query block, all-equal keys) pick the lowest indices, as the Triton kernel does."""
    values = torch.tensor([-1.0, 2.0, -0.5, float("nan"), 2.0, -3.0, 2.0, 0.0, -0.0, 1.0])
    k_pool = values.view(1, 1, -1, 1)
    expected = {1: [1], 3: [1, 4, 6], 4: [1, 4, 6, 9], 6: [1, 4, 6, 7, 8, 9], 9: [0, 1, 2, 4, 5, 6, 7, 8, 9]}
    for count, blocks in expected.items():
        assert select_blocks_ref(torch.ones(1, 1, 1, 1), k_pool, count / 10).tolist() == [[[blocks]]], count
    # A zero query block ties every key block.
    lut = select_blocks_ref(torch.zeros(1, 1, 1, 8), torch.randn(1, 1, 40, 8), 0.25)
    assert lut.tolist() == [[[list(range(10))]]]
