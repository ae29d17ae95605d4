"""Ulysses sequence parallelism (sagesla.parallel): N ranks against one device, argument checks, ring fallback.

The CPU tests run 2 processes of the gloo backend on the torch reference; the ``multigpu`` test runs 2 GPUs over
NCCL on the Triton kernels.
"""

import dataclasses
import pathlib
import sys

import pytest
import torch

import sagesla
from sagesla import metrics
from sagesla.launch import spawn_ranks
from sagesla.wan_shapes import WAN_SHAPES, build_wan, run_wan, wan_step_inputs

pytest.importorskip("diffusers")

from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig  # noqa: E402

from sagesla.parallel import enable_ulysses  # noqa: E402
from sagesla.patching.processor import Projected  # noqa: E402


@pytest.fixture
def spawn(monkeypatch):
    """``spawn_ranks`` with the repository root on ``sys.path``: pytest imports this file as ``tests.test_parallel``
    without putting the root there, and each spawned rank imports that module to find ``ulysses_vs_one_device``.
    The root goes last, so the installed packages come first: its ``kernels/`` folder must not shadow Hugging Face's
    ``kernels``, which transformers imports."""
    monkeypatch.setattr(sys, "path", [*sys.path, str(pathlib.Path(__file__).parents[1])])
    return spawn_ranks


def ulysses_vs_one_device(
    shape_name: str,
    num_layers: int,
    topk: float,
    quantized: bool,
    backend: str,
    dtype_name: str,
    degree: int,
    profile: str | None = None,
) -> dict:
    """On every rank: one patched Wan step on this rank's device alone, then under ``enable_ulysses(degree)``.

    The SLA layers get random ``proj_l`` weights and per-layer topk ``topk, topk * 2, ...`` (capped at 1), or the
    per-layer, per-timestep-bucket topk of the calibration profile file ``profile``, so the linear branch and
    per-layer settings are exercised. Returns rel-L1 and max |diff| of the N-rank output against
    the one-device output, both runs' per-layer sparsity and fallback reasons (rank 0's, for ``spawn_ranks``).
    """
    rank = torch.distributed.get_rank()
    device = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    shape = WAN_SHAPES[shape_name]
    shape = dataclasses.replace(shape, config={**shape.config, "num_layers": num_layers})
    torch.manual_seed(0)
    model = build_wan(shape, device, dtype)
    names = [f"blocks.{i}.attn1" for i in range(num_layers)]
    layer_topk = profile or {n: min(1.0, topk * 2**i) for i, n in enumerate(names)}
    sagesla.patch(model, profile=layer_topk, quantized=quantized, backend=backend)
    for name in names:
        torch.nn.init.normal_(model.get_submodule(name).sla.proj_l.weight, std=0.05)
    inputs = wan_step_inputs(shape, device, dtype)
    processors = [model.get_submodule(n).processor for n in names]

    def step() -> tuple[torch.Tensor, list, list]:
        out = run_wan(model, inputs)
        return out, [p.last_sparsity for p in processors], [p.last_fallback for p in processors]

    one, one_sparsity, one_fallbacks = step()
    enable_ulysses(model, degree)
    many, many_sparsity, many_fallbacks = step()
    return {
        "rel_l1": metrics.rel_l1(many, one),
        "max_abs": float((many.double() - one.double()).abs().max()),
        "sparsity": [one_sparsity, many_sparsity],
        "fallbacks": [one_fallbacks, many_fallbacks],
    }


def _check_against_one_device(result: dict, tol: float) -> None:
    assert result["rel_l1"] < tol, result
    one_sparsity, many_sparsity = result["sparsity"]
    assert many_sparsity == one_sparsity and min(one_sparsity) > 0, result
    assert result["fallbacks"] == [[None] * len(one_sparsity)] * 2, result


@pytest.mark.parametrize("quantized", [False, True])
def test_ulysses_on_two_cpu_ranks_matches_one_process(spawn, quantized):
    # fp32 on the reference backend: rel-L1 1.3e-7 measured (GEMMs over S / 2 rows on each rank round differently).
    result = spawn(ulysses_vs_one_device, 2, "tiny", 2, 0.25, quantized, "torch", "float32", 2)
    _check_against_one_device(result, 1e-5)


def test_ulysses_follows_a_calibration_profile_with_timestep_buckets(spawn, tmp_path):
    from sagesla.calibration import calibrate
    from sagesla.wan_shapes import tiny_wan_transformer

    inputs = [(torch.randn(1, 16, 4, 16, 16), torch.randn(1, 8, 32))]
    profile = calibrate(tiny_wan_transformer(), inputs, steps=4, budget=0.5, buckets=2, progress=False)
    assert profile.topk.shape == (2, 2) and float(profile.topk.max()) < 1  # 2 layers x 2 timestep buckets
    profile.save(tmp_path / "tiny.profile")
    args = ("tiny", 2, 0.25, True, "torch", "float32", 2, str(tmp_path / "tiny.profile"))
    _check_against_one_device(spawn(ulysses_vs_one_device, 2, *args), 1e-5)


@pytest.mark.gpu
@pytest.mark.multigpu
def test_ulysses_on_two_gpus_matches_one_gpu(spawn):
    # Wan2.1-1.3B's heads and 32760 tokens, 2 of its 30 blocks, SageSLA on Triton in bf16.
    result = spawn(ulysses_vs_one_device, 2, "wan2.1-1.3b", 2, 0.05, True, "triton", "bfloat16", 2, backend="nccl")
    _check_against_one_device(result, 1e-2)


def test_ring_attention_calls_fall_back(tiny_wan):
    sagesla.patch(tiny_wan, topk=0.5)
    processor, sla = tiny_wan.blocks[0].attn1.processor, tiny_wan.blocks[0].attn1.sla
    q = k = v = torch.randn(1, 256, 2, 64)
    assert processor._fallback_reason(sla, Projected(q, k, v)) is None
    processor._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    assert processor.original._parallel_config is processor._parallel_config
    assert processor._fallback_reason(sla, Projected(q, k, v)).startswith("ring attention is on")
    # Under Ulysses each rank holds S / N tokens: 64 of them are 128 tokens of the sequence SLA sees, one block.
    processor._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    assert processor._fallback_reason(sla, Projected(q[:, :64], k[:, :64], v[:, :64])) is None


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
