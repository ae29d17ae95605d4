"""scripts/attention_mass.py: the share of attention mass in the kept key blocks, against a direct computation."""

import pathlib
import runpy

import pytest
import torch
import torch.nn.functional as F

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "attention_mass.py"


@pytest.fixture(scope="module")
def script():
    pytest.importorskip("diffusers")
    return runpy.run_path(str(SCRIPT))


def _direct(q, k, block, lut):
    """Loop form in float64: for each query row, the softmax mass on the keys of its block's listed key blocks."""
    shares = []
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                p = torch.softmax(q[b, h, i].double() @ k[b, h].double().T / q.shape[-1] ** 0.5, dim=0)
                keys = torch.cat([torch.arange(j * block, (j + 1) * block) for j in lut[b, h, i // block].tolist()])
                shares.append(p[keys].sum())
    return float(torch.stack(shares).mean())


def test_block_mass_matches_a_direct_computation(script):
    from sagesla.kernels.block_select_ref import select_blocks_ref
    from sagesla.kernels.blocks_ref import to_blocks

    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 48, 8, generator=gen) * 2 for _ in range(2))
    chosen, best = script["block_mass"](q, k, 8, 0.34)  # 2 of 6 key blocks
    lut = select_blocks_ref(to_blocks(q, 8).mean(-2), to_blocks(k, 8).mean(-2), 0.34)
    assert chosen == pytest.approx(_direct(q, k, 8, lut), rel=1e-9)
    assert chosen <= best + 1e-12 and 0 < chosen < 1
    assert script["block_mass"](q, k, 8, 1.0) == pytest.approx((1.0, 1.0))


def test_block_mass_finds_concentrated_attention(script):
    # each query block attends to one key block (keys equal to its queries, large scale): the kept block holds it all
    base = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)) * 10
    q = k = base.repeat_interleave(8, dim=0)[None, None]  # [1, 1, 32, 16]
    chosen, best = script["block_mass"](q, k, 8, 0.25)
    assert chosen == pytest.approx(1.0, abs=1e-6) and best == pytest.approx(1.0, abs=1e-6)


def test_self_attention_calls_records_only_self_attention_and_restores_sdpa(script):
    sdpa = F.scaled_dot_product_attention
    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 4, 8)
    with script["self_attention_calls"]() as calls:
        F.scaled_dot_product_attention(q, q, q)
        F.scaled_dot_product_attention(query=q, key=k, value=k)  # cross-attention: other key count
    assert len(calls) == 1 and torch.equal(calls[0][0], q) and F.scaled_dot_product_attention is sdpa


def test_main_prints_one_line_per_topk_for_the_shipped_model(script, monkeypatch, capsys):
    from sagesla.embedded.model import WEIGHTS

    if not WEIGHTS.is_file():
        pytest.skip("the embedded weights are not in this checkout")
    monkeypatch.setattr("sys.argv", ["attention_mass.py", "--steps", "1", "--topk", "0.1", "0.5"])
    script["main"]()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("6 self-attention calls (6 layers x 1 steps), 2048 tokens, block 64")
    assert lines[1].startswith("topk 0.1 (3 of 32 key blocks)") and lines[2].startswith(
        "topk 0.5 (16 of 32 key blocks)"
    )
