"""sagesla.patch with the rest of a diffusers pipeline, on a tiny WanTransformer3DModel on CPU: LoRA adapters (peft),
model and group offloading hooks, torchao- and GGUF-quantized base weights, and diffusers' step caches.

Each test checks both orders where the order could matter, that the patched model at topk=1.0 matches the unpatched
model with the same addition within SLA's error, and that ``sagesla.unpatch`` (and removing the addition) gives back
exactly what the model computed without SLA. The peft, torchao and gguf tests skip where the package is missing;
``docs/patching.md`` ("With the rest of the pipeline") gives the order of calls and the limits found here.
"""

import copy
import pathlib

import pytest
import torch
from torch import nn

import sagesla
from sagesla import metrics
from sagesla.testing import assert_close, sla_processors
from sagesla.wan_shapes import run_wan, tiny_wan_transformer, wan_inputs

diffusers = pytest.importorskip("diffusers")

from diffusers.hooks import (  # noqa: E402
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    TaylorSeerCacheConfig,
)

# tests/test_patch.py's MODEL_TOL[True]: rel-L1 of the model output of SageSLA (INT8 Q/K, FP8 P/V) at topk=1.0 with
# zero proj_l against the unpatched model (measured 3.2e-4 to 3.6e-4 there). With the LoRAs, quantized weights and
# caches below the same comparison measured 1.1e-4 to 4.1e-4 over seeds 42-45.
MODEL_TOL = 1e-3
LAYERS = ["blocks.0.attn1", "blocks.1.attn1"]
DIM, RANK = 128, 4
# peft's note when a second adapter joins the first: stacking them is the point here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture
def model() -> nn.Module:
    return tiny_wan_transformer()


def assert_ran_sla(model: nn.Module, sparsity: float = 0.0) -> None:
    """Every patched layer's last call ran SLA (no dense fallback) and skipped ``sparsity`` of the block pairs."""
    processors = list(sla_processors(model).values())
    assert len(processors) == len(LAYERS)
    assert all(p.last_fallback is None and p.last_sparsity == sparsity for p in processors)


# --- LoRA (diffusers' PeftAdapterMixin on the transformer; needs peft) ---------------------------------------------


def lora_weights(seed: int, scale: float = 0.1) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(self-attention projection, down [RANK, DIM], up [DIM, RANK]) for q, k, v, out of each block's attn1."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            f"blocks.{block}.attn1.{projection}",
            torch.randn(RANK, DIM, generator=generator) * scale,
            torch.randn(DIM, RANK, generator=generator) * scale,
        )
        for block in range(2)
        for projection in ("to_q", "to_k", "to_v", "to_out.0")
    ]


def distillation_lora(seed: int = 1) -> dict[str, torch.Tensor]:
    """A LoRA in the original Wan key format of the step-distillation LoRAs (``diffusion_model.blocks.i.self_attn.q
    .lora_down.weight``, ``.alpha``), converted by diffusers' Wan LoRA loader as ``pipe.load_lora_weights`` does."""
    from diffusers import WanPipeline

    original = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}
    state = {}
    for layer, down, up in lora_weights(seed):
        block, projection = layer.rsplit(".attn1.", 1)
        key = f"diffusion_model.{block}.self_attn.{original[projection]}"
        state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(RANK)}
    return WanPipeline.lora_state_dict(state)


def load_loras(model: nn.Module) -> None:
    """Stack two adapters as users do: a distillation LoRA at 1.0 (the pipeline's loader, prefix "transformer") and
    a diffusers-format one (``blocks.i.attn1.to_q.lora_A.weight``) at 0.5."""
    from diffusers import WanPipeline

    WanPipeline.load_lora_into_transformer(distillation_lora(), transformer=model, adapter_name="distill")
    style = {}
    for layer, down, up in lora_weights(seed=2):
        style |= {f"{layer}.lora_A.weight": down, f"{layer}.lora_B.weight": up}
    model.load_lora_adapter(style, adapter_name="style", prefix=None)
    model.set_adapters(["distill", "style"], [1.0, 0.5])


@pytest.fixture
def lora_reference(model):
    """(unpatched model's output, LoRA'd unpatched model's output, inputs); the fixture model stays un-LoRA'd."""
    pytest.importorskip("peft")
    inputs = wan_inputs()
    base = run_wan(model, inputs)
    lora = copy.deepcopy(model)
    load_loras(lora)
    reference = run_wan(lora, inputs)
    # The adapters change the output by far more than SLA's error.
    assert metrics.rel_l1(reference, base) > 10 * MODEL_TOL
    return base, reference, inputs


@pytest.mark.parametrize("order", ["patch_then_lora", "lora_then_patch"])
def test_lora_adapters_match_the_lora_unpatched_model(model, lora_reference, order):
    _, reference, inputs = lora_reference
    if order == "patch_then_lora":
        sagesla.patch(model, topk=1.0, backend="torch")
        load_loras(model)
    else:
        load_loras(model)
        sagesla.patch(model, topk=1.0, backend="torch")
    # The adapters wrap the projections SLA's processor calls; SLA's own proj_l gets none.
    assert type(model.blocks[0].attn1.to_q).__module__.startswith("peft.")
    assert isinstance(model.blocks[0].attn1.sla.proj_l, nn.Linear)
    assert not [key for key in model.state_dict() if ".sla." in key and "lora" in key]
    assert_close("patched + LoRA", reference, run_wan(model, inputs), MODEL_TOL)
    assert_ran_sla(model)
    assert sagesla.unpatch(model) == LAYERS
    assert torch.equal(run_wan(model, inputs), reference)
    assert set(model.peft_config) == {"distill", "style"}


def test_lora_on_a_sparse_patch_runs_sparse(model, lora_reference):
    _, reference, inputs = lora_reference
    sagesla.patch(model, topk=0.25, backend="torch")
    load_loras(model)
    out = run_wan(model, inputs)
    assert torch.isfinite(out).all()
    # 4 key blocks: topk 0.25 keeps 1 per query block.
    assert_ran_sla(model, sparsity=0.75)
    assert metrics.rel_l1(out, reference) > 10 * MODEL_TOL


def test_fuse_unfuse_and_disable_lora_on_a_patched_model(model, lora_reference):
    base, reference, inputs = lora_reference
    sagesla.patch(model, topk=1.0, backend="torch")
    load_loras(model)
    unfused = run_wan(model, inputs)
    model.fuse_lora(adapter_names=["distill", "style"])
    fused = run_wan(model, inputs)
    assert_close("fused", reference, fused, MODEL_TOL)
    # Fusing adds the adapters into the fp32 weights: equal up to rounding, which SLA's quantization may amplify.
    assert_close("fused vs unfused", unfused, fused, 1e-4)
    model.unfuse_lora()
    assert_close("unfused again", unfused, run_wan(model, inputs), 1e-4)
    model.disable_lora()
    assert_close("LoRA disabled", base, run_wan(model, inputs), MODEL_TOL)
    model.enable_lora()
    model.delete_adapters(["distill", "style"])
    sagesla.unpatch(model)
    assert_close("adapters deleted, unpatched", base, run_wan(model, inputs), 1e-6)


# --- offloading hooks ----------------------------------------------------------------------------------------------
# On a machine without an accelerator every hook moves tensors from the CPU to the CPU: these tests check that the
# hooks and SLA run together in both orders, and that block-level group offloading moves the `sla` submodules' proj_l
# with their block. test_offload_to_cuda (gpu) repeats them with a real move to the GPU.


def onloaded_parameters(monkeypatch) -> set[int]:
    """ids of the parameters diffusers' group offloading moves to the onload device (filled as groups onload)."""
    from diffusers.hooks import group_offloading

    moved: set[int] = set()
    onload = group_offloading.ModuleGroup.onload_

    def record(group):
        moved.update(id(p) for module in group.modules for p in module.parameters())
        moved.update(id(p) for p in group.parameters)
        return onload(group)

    monkeypatch.setattr(group_offloading.ModuleGroup, "onload_", record)
    return moved


def offload(model: nn.Module, kind: str, device: str = "cpu") -> None:
    if kind == "model":
        # What pipe.enable_model_cpu_offload() installs on each component.
        from accelerate import cpu_offload_with_hook

        cpu_offload_with_hook(model, execution_device=torch.device(device))
    else:
        model.enable_group_offload(
            onload_device=torch.device(device),
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
        )


def has_offload_hooks(model: nn.Module, kind: str) -> bool:
    if kind == "model":
        return hasattr(model, "_hf_hook")
    registry = getattr(model.blocks[0], "_diffusers_hook", None)
    return registry is not None and registry.get_hook("group_offloading") is not None


@pytest.mark.parametrize("order", ["patch_then_offload", "offload_then_patch"])
@pytest.mark.parametrize("kind", ["model", "group_block_level"])
def test_offload_hooks_on_cpu(model, monkeypatch, kind, order):
    pytest.importorskip("accelerate")
    inputs = wan_inputs()
    reference = run_wan(model, inputs)
    moved = onloaded_parameters(monkeypatch)
    if order == "patch_then_offload":
        sagesla.patch(model, topk=1.0, backend="torch")
        offload(model, kind)
    else:
        offload(model, kind)
        sagesla.patch(model, topk=1.0, backend="torch")
    assert_close("patched + offloaded", reference, run_wan(model, inputs), MODEL_TOL)
    assert_ran_sla(model)
    if kind == "group_block_level":
        # Each block's group moves all the block's parameters as they are at onload, the sla submodule's included.
        proj_l = [model.get_submodule(f"{layer}.sla.proj_l") for layer in LAYERS]
        assert {id(p) for module in proj_l for p in module.parameters()} <= moved
    assert sagesla.unpatch(model) == LAYERS
    assert has_offload_hooks(model, kind)
    assert torch.equal(run_wan(model, inputs), reference)


def test_disk_group_offload_of_a_patched_model(model, tmp_path):
    # With offload_to_disk_path a group lists its tensors once, when offloading is enabled, and moves those alone:
    # patch first, so that the list holds the sla submodules' proj_l (patched later, they would stay behind).
    inputs = wan_inputs()
    reference = run_wan(model, inputs)
    sagesla.patch(model, topk=1.0, backend="torch")
    model.enable_group_offload(
        onload_device=torch.device("cpu"),
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        offload_to_disk_path=str(tmp_path),
    )
    for block, layer in zip(model.blocks, LAYERS, strict=True):
        listed = block._diffusers_hook.get_hook("group_offloading").group.tensor_to_key
        assert all(any(p is tensor for tensor in listed) for p in model.get_submodule(f"{layer}.sla").parameters())
    assert_close("patched + disk offload", reference, run_wan(model, inputs), MODEL_TOL)
    assert_ran_sla(model)
    sagesla.unpatch(model)
    assert torch.equal(run_wan(model, inputs), reference)


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["patch_then_offload", "offload_then_patch"])
@pytest.mark.parametrize("kind", ["model", "group_block_level"])
def test_offload_to_cuda(model, kind, order):
    pytest.importorskip("accelerate")
    inputs = tuple(x.cuda() for x in wan_inputs())
    reference = run_wan(copy.deepcopy(model).cuda(), inputs)
    if order == "patch_then_offload":
        sagesla.patch(model, topk=1.0, backend="torch")
        offload(model, kind, "cuda")
    else:
        offload(model, kind, "cuda")
        sagesla.patch(model, topk=1.0, backend="torch")
    assert_close("patched + offloaded", reference, run_wan(model, inputs), MODEL_TOL)
    assert_ran_sla(model)
    if kind == "group_block_level":
        # Offloaded again after the forward, proj_l with its block.
        assert model.blocks[0].attn1.sla.proj_l.weight.device.type == "cpu"
    sagesla.unpatch(model)
    assert_close("unpatched", reference, run_wan(model, inputs), 1e-6)


# --- quantized base weights ----------------------------------------------------------------------------------------


def not_sla(module: nn.Module, name: str) -> bool:
    """torchao's default filter (every nn.Linear) less SLA's proj_l, which SLA reads as a plain fp32 tensor."""
    return isinstance(module, nn.Linear) and ".sla." not in f".{name}."


@pytest.mark.parametrize("order", ["quantize_then_patch", "patch_then_quantize_without_sla"])
def test_torchao_int8_weights(model, order):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    inputs = wan_inputs()
    unquantized = run_wan(model, inputs)
    quantized = copy.deepcopy(model)
    quantize_(quantized, Int8WeightOnlyConfig())
    reference = run_wan(quantized, inputs)
    assert metrics.rel_l1(reference, unquantized) > 0
    if order == "quantize_then_patch":
        quantize_(model, Int8WeightOnlyConfig())
        sagesla.patch(model, topk=1.0, backend="torch")
    else:
        sagesla.patch(model, topk=1.0, backend="torch")
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=not_sla)
    assert type(model.blocks[0].attn1.to_q.weight).__name__ == type(quantized.blocks[0].attn1.to_q.weight).__name__
    assert type(model.blocks[0].attn1.sla.proj_l.weight) is nn.Parameter
    assert_close("patched + int8 weights", reference, run_wan(model, inputs), MODEL_TOL)
    assert_ran_sla(model)
    sagesla.unpatch(model)
    assert torch.equal(run_wan(model, inputs), reference)


def write_gguf(model: nn.Module, folder: pathlib.Path) -> pathlib.Path:
    """The model's state dict as a GGUF file (Q8_0 for every weight matrix of rows of 32k, F32 for the rest), with
    its diffusers config beside it, so ``from_single_file`` needs neither key conversion nor the hub."""
    import gguf

    model.save_config(folder)
    path = folder / "tiny-wan-q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "wan")
    for key, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            packed = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(key, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_quantized_weights(model, tmp_path):
    pytest.importorskip("gguf")
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

    path = write_gguf(model, tmp_path)
    config = GGUFQuantizationConfig(compute_dtype=torch.float32)
    loaded = WanTransformer3DModel.from_single_file(
        str(path), config=str(tmp_path), quantization_config=config, torch_dtype=torch.float32
    ).eval()
    assert type(loaded.blocks[0].attn1.to_q).__name__ == "GGUFLinear"
    inputs = wan_inputs()
    reference = run_wan(loaded, inputs)
    assert 0 < metrics.rel_l1(reference, run_wan(model, inputs)) < 1e-2
    sagesla.patch(loaded, topk=1.0, backend="torch")
    assert_close("patched + GGUF Q8_0 weights", reference, run_wan(loaded, inputs), MODEL_TOL)
    assert_ran_sla(loaded)
    sagesla.unpatch(loaded)
    assert torch.equal(run_wan(loaded, inputs), reference)


# --- step caches (diffusers.hooks, through the model's CacheMixin) -------------------------------------------------

STEPS = 4
CACHES = {
    "first_block": lambda: FirstBlockCacheConfig(threshold=0.2),
    # Given magnitude ratios (no calibration run): skips steps by the accumulated ratio error alone.
    "mag": lambda: MagCacheConfig(
        num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS, threshold=0.5, max_skip_steps=2, retention_ratio=0.25
    ),
    # Its default identifiers ("^blocks.*attn") match no Wan layer (attn1 / attn2): name the self-attention layers,
    # whose output it then extrapolates on the steps between full ones.
    "taylorseer": lambda: TaylorSeerCacheConfig(
        cache_interval=2,
        disable_cache_before_step=1,
        cache_identifiers=[r"blocks\.\d+\.attn1"],
        taylor_factors_dtype=torch.float32,
    ),
}


def sample(model: nn.Module, latent: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, int]:
    """STEPS Euler flow-matching steps under the model's cache context, as diffusers' WanPipeline runs them:
    (final latent, how many times a self-attention layer computed its projections)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if model.is_cache_enabled:
        model._reset_stateful_cache()
    computed = []
    handles = [block.attn1.to_q.register_forward_hook(lambda *_: computed.append(1)) for block in model.blocks]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(STEPS)
    x = latent
    try:
        for index, timestep in enumerate(scheduler.timesteps):
            context = {"step_index": index, "sigma": float(scheduler.sigmas[index]), "num_inference_steps": STEPS}
            with torch.no_grad(), model.cache_context("cond", **context):
                velocity = model(
                    hidden_states=x, timestep=timestep[None], encoder_hidden_states=text, return_dict=False
                )
            x = scheduler.step(velocity[0], timestep, x, return_dict=False)[0]
    finally:
        for handle in handles:
            handle.remove()
    return x, len(computed)


@pytest.mark.parametrize("order", ["patch_then_cache", "cache_then_patch"])
@pytest.mark.parametrize("cache", list(CACHES))
def test_step_cache(model, cache, order):
    latent, _, text = wan_inputs()
    plain, computed_plain = sample(model, latent, text)
    assert computed_plain == STEPS * len(LAYERS)
    cached_model = copy.deepcopy(model)
    cached_model.enable_cache(CACHES[cache]())
    reference, computed = sample(cached_model, latent, text)
    # The cache skipped work and changed the result.
    assert computed < STEPS * len(LAYERS) and not torch.equal(reference, plain)

    if order == "patch_then_cache":
        sagesla.patch(model, topk=1.0, backend="torch")
        model.enable_cache(CACHES[cache]())
    else:
        model.enable_cache(CACHES[cache]())
        sagesla.patch(model, topk=1.0, backend="torch")
    out, computed_patched = sample(model, latent, text)
    assert computed_patched == computed
    assert_close(f"patched + {cache} cache", reference, out, MODEL_TOL)
    assert_ran_sla(model)

    if order == "patch_then_cache":
        model.disable_cache()
        registry = HookRegistry.check_if_exists_or_initialize(model)
        assert not any(child.hooks for child in registry._get_child_registries())
        sagesla.unpatch(model)
    else:
        sagesla.unpatch(model)
        assert torch.equal(sample(model, latent, text)[0], reference)
        model.disable_cache()
    assert torch.equal(sample(model, latent, text)[0], plain)
