"""Ulysses sequence parallelism (sagesla.parallel): N ranks against one device, argument checks, ring fallback.

The CPU tests run 2 processes of the gloo backend on the torch reference; the ``multigpu`` test runs 2 GPUs over
NCCL on the Triton kernels.
"""

import pytest
import torch

import sagesla
from sagesla.testing import spawn_ranks, ulysses_vs_one_device

pytest.importorskip("diffusers")

from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig  # noqa: E402

from sagesla.parallel import enable_ulysses  # noqa: E402


def _check_against_one_device(result: dict, tol: float) -> None:
    assert result["rel_l1"] < tol, result
    one_sparsity, many_sparsity = result["sparsity"]
    assert many_sparsity == one_sparsity and min(one_sparsity) > 0, result
    assert result["fallbacks"] == [[None] * len(one_sparsity)] * 2, result


@pytest.mark.parametrize("quantized", [False, True])
def test_ulysses_on_two_cpu_ranks_matches_one_process(quantized):
    # fp32 on the reference backend: rel-L1 1.3e-7 measured (GEMMs over S / 2 rows on each rank round differently).
    result = spawn_ranks(ulysses_vs_one_device, 2, "tiny", 2, 0.25, quantized, "torch", "float32", 2)
    _check_against_one_device(result, 1e-5)


def test_ulysses_follows_a_calibration_profile_with_timestep_buckets(tmp_path):
    from sagesla.calibration import calibrate
    from sagesla.testing import tiny_wan_transformer

    inputs = [(torch.randn(1, 16, 4, 16, 16), torch.randn(1, 8, 32))]
    profile = calibrate(tiny_wan_transformer(), inputs, steps=4, budget=0.5, buckets=2, progress=False)
    assert profile.topk.shape == (2, 2) and float(profile.topk.max()) < 1  # 2 layers x 2 timestep buckets
    profile.save(tmp_path / "tiny.profile")
    args = ("tiny", 2, 0.25, True, "torch", "float32", 2, str(tmp_path / "tiny.profile"))
    _check_against_one_device(spawn_ranks(ulysses_vs_one_device, 2, *args), 1e-5)


@pytest.mark.gpu
@pytest.mark.multigpu
def test_ulysses_on_two_gpus_matches_one_gpu():
    # Wan2.1-1.3B's heads and 32760 tokens, 2 of its 30 blocks, SageSLA on Triton in bf16.
    result = spawn_ranks(
        ulysses_vs_one_device, 2, "wan2.1-1.3b", 2, 0.05, True, "triton", "bfloat16", 2, backend="nccl"
    )
    _check_against_one_device(result, 1e-2)


def test_ring_attention_calls_fall_back(tiny_wan):
    sagesla.patch(tiny_wan, topk=0.5)
    processor, sla = tiny_wan.blocks[0].attn1.processor, tiny_wan.blocks[0].attn1.sla
    q = k = v = torch.randn(1, 256, 2, 64)
    assert processor._fallback_reason(sla, q, k, v, None) is None
    processor._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    assert processor.original._parallel_config is processor._parallel_config
    assert processor._fallback_reason(sla, q, k, v, None).startswith("ring attention is on")
    # Under Ulysses each rank holds S / N tokens: 64 of them are 128 tokens of the sequence SLA sees, one block.
    processor._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    assert processor._fallback_reason(sla, q[:, :64], k[:, :64], v[:, :64], None) is None


def test_enable_ulysses_needs_torch_distributed(tiny_wan):
    with pytest.raises(RuntimeError, match="init_process_group"):
        enable_ulysses(tiny_wan)


def test_enable_ulysses_rejects_other_models():
    with pytest.raises(TypeError, match="WanTransformer3DModel, got Linear"):
        enable_ulysses(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("degree", "message"),
    [
        (1, r"`degree` must be an int in \[2, world size 4\], got 1"),
        (8, r"got 8"),
        (True, r"got True"),
        (4, r"`degree` 4 must divide the 2 heads of blocks.0.attn1 \(or pass uneven=True\)"),
    ],
)
def test_enable_ulysses_rejects_bad_degrees(tiny_wan, monkeypatch, degree, message):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    with pytest.raises(ValueError, match=message):
        enable_ulysses(tiny_wan, degree)
    assert tiny_wan._parallel_config is None
