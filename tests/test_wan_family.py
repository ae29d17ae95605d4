"""sagesla.patch on every diffusers Wan-family transformer (tiny random configs on CPU), and the diffusers internals
the patcher relies on (sagesla/patching/diffusers_api.py)."""

import copy
import dataclasses
import importlib
import logging
import pathlib
from collections.abc import Callable

import pytest
import torch

import sagesla
from sagesla.testing import assert_close, sla_processors
from sagesla.wan_shapes import TINY_WAN_CONFIG, wan_inputs

diffusers = pytest.importorskip("diffusers")

from sagesla.patching import diffusers_api  # noqa: E402
from sagesla.patching.wan import CROSS_ATTENTION, SLAWanAttnProcessor  # noqa: E402

# rel-L1 of the model output against the unpatched model, SLA (quantized=False, bf16) at topk=1.0 with zero proj_l on
# the torch backend: tests/test_patch.py's MODEL_TOL[False] (dense attention up to 16-bit rounding). Measured over
# seeds 0-3: 1.9e-5 to 3.1e-5 for every family here; topk=0.25 moves the output by 1e-2 to 1.6e-2.
MODEL_TOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Family:
    """A tiny random model of one Wan-family class, its inputs and its attention layers."""

    model: str  # the diffusers class name
    config: dict
    inputs: Callable[[], dict]
    self_attention: tuple[str, ...]  # the layers SLA serves
    cross_attention: tuple[str, ...]

    def build(self) -> torch.nn.Module:
        return getattr(diffusers, self.model)(**self.config).eval()


def _run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return torch.stack(out) if isinstance(out, list) else out


def _wan_inputs() -> dict:
    latent, timestep, text = wan_inputs()  # 4 x 16 x 16 latent: 256 tokens, 4 key blocks of 64
    return {"hidden_states": latent, "timestep": timestep, "encoder_hidden_states": text}


def _i2v_inputs() -> dict:
    # The I2V processor takes the last 512 context tokens as text, the ones before as image.
    return _wan_inputs() | {
        "encoder_hidden_states": torch.randn(1, 512, 32),
        "encoder_hidden_states_image": torch.randn(1, 4, 16),
    }


def _vace_inputs() -> dict:
    return _wan_inputs() | {"control_hidden_states": torch.randn(1, 48, 4, 16, 16)}


def _animate_inputs() -> dict:
    # 5 latent frames of 16 x 16 (320 tokens); 13 face frames give the face adapter 5 motion frames, one per latent one.
    return {
        "hidden_states": torch.randn(1, 12, 5, 16, 16),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 8, 32),
        "encoder_hidden_states_image": torch.randn(1, 4, 16),
        "pose_hidden_states": torch.randn(1, 4, 4, 16, 16),
        "face_pixel_values": torch.randn(1, 3, 13, 16, 16),
    }


def _blocks(prefix: str, layer: str, count: int = 2) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}.{layer}" for i in range(count))


_ANIMATE = {
    **TINY_WAN_CONFIG,
    "in_channels": 12,
    "latent_channels": 4,
    "out_channels": 4,
    "image_dim": 16,
    "motion_encoder_channel_sizes": {"4": 16, "8": 16, "16": 16},
    "motion_encoder_size": 16,
    "motion_style_dim": 8,
    "motion_dim": 4,
    "motion_encoder_dim": 16,
    "face_encoder_hidden_dim": 16,
    "face_encoder_num_heads": 2,
    "inject_face_latents_blocks": 2,
}
FAMILIES = {
    "wan-t2v": Family(
        "WanTransformer3DModel", TINY_WAN_CONFIG, _wan_inputs, _blocks("blocks", "attn1"), _blocks("blocks", "attn2")
    ),
    "wan-i2v": Family(
        "WanTransformer3DModel",
        {**TINY_WAN_CONFIG, "image_dim": 16, "added_kv_proj_dim": 128},
        _i2v_inputs,
        _blocks("blocks", "attn1"),
        _blocks("blocks", "attn2"),
    ),
    "vace": Family(
        "WanVACETransformer3DModel",
        {**TINY_WAN_CONFIG, "vace_layers": [0, 1], "vace_in_channels": 48},
        _vace_inputs,
        _blocks("blocks", "attn1") + _blocks("vace_blocks", "attn1"),
        _blocks("blocks", "attn2") + _blocks("vace_blocks", "attn2"),
    ),
    "animate": Family(
        "WanAnimateTransformer3DModel",
        _ANIMATE,
        _animate_inputs,
        _blocks("blocks", "attn1"),
        _blocks("blocks", "attn2") + ("face_adapter.0",),
    ),
    "chronoedit": Family(
        "ChronoEditTransformer3DModel",
        TINY_WAN_CONFIG,
        _wan_inputs,
        _blocks("blocks", "attn1"),
        _blocks("blocks", "attn2"),
    ),
    "skyreels-v2": Family(
        "SkyReelsV2Transformer3DModel",
        TINY_WAN_CONFIG,
        _wan_inputs,
        _blocks("blocks", "attn1"),
        _blocks("blocks", "attn2"),
    ),
}


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


def test_report_names_every_layer(family):
    model = family.build()
    report = sagesla.patch(model, topk=0.5, quantized=False, backend="torch")
    assert report.replaced == dict.fromkeys(family.self_attention, 0.5)
    assert report.skipped == dict.fromkeys(family.cross_attention, CROSS_ATTENTION)
    assert sorted(sla_processors(model)) == sorted(f"{name}.processor" for name in family.self_attention)
    for name in family.self_attention:
        layer = model.get_submodule(name)
        assert layer.sla.head_dim == 64 and type(layer.processor.original) in diffusers_api.resolve().served


def test_topk_one_matches_the_unpatched_model(family):
    model, inputs = family.build(), family.inputs()
    ref = _run(model, inputs)
    sagesla.patch(model, topk=1.0, quantized=False, backend="torch")
    out = _run(model, inputs)
    processors = sla_processors(model).values()
    assert len(processors) == len(family.self_attention)
    assert all(p.last_fallback is None and p.last_sparsity == 0.0 for p in processors)
    assert not torch.equal(out, ref)  # SLA ran, not a silent dense fallback
    assert_close(family.model, ref, out, MODEL_TOL)


def test_topk_below_one_skips_blocks_and_changes_the_output(family):
    model, inputs = family.build(), family.inputs()
    ref = _run(model, inputs)
    sagesla.patch(model, topk=0.25, quantized=False, backend="torch")
    out = _run(model, inputs)
    assert torch.isfinite(out).all()
    assert all(p.last_fallback is None and p.last_sparsity > 0.5 for p in sla_processors(model).values())
    with pytest.raises(AssertionError, match="rel-L1"):
        assert_close(family.model, ref, out, 10 * MODEL_TOL)


def test_dense_fallback_reproduces_diffusers_bit_for_bit(family):
    # Blocks longer than the sequence: every call runs diffusers' attention on the SLA processor's q, k, v, so this
    # checks the mirrored projections, QK-norm and RoPE of each family exactly.
    model, inputs = family.build(), family.inputs()
    ref = _run(model, inputs)
    sagesla.patch(model, topk=0.5, quantized=False, backend="torch", block_q=512, block_k=512)
    assert torch.equal(_run(model, inputs), ref)
    assert all("shorter than one 512x512 block" in p.last_fallback for p in sla_processors(model).values())


def test_unpatch_restores_the_never_patched_model_exactly(family):
    model, inputs = family.build(), family.inputs()
    never = copy.deepcopy(model)
    processors = dict(model.attn_processors)
    keys = list(model.state_dict())
    sagesla.patch(model, topk=0.5)
    with torch.no_grad():
        model.get_submodule(family.self_attention[0]).sla.proj_l.weight.normal_()
    ref = _run(never, inputs)
    assert not torch.equal(_run(model, inputs), ref)
    assert sorted(sagesla.unpatch(model)) == sorted(family.self_attention)
    assert torch.equal(_run(model, inputs), ref)
    assert model.attn_processors == processors
    assert list(model.state_dict()) == keys
    assert not any(hasattr(model.get_submodule(name), "sla") for name in family.self_attention)


def test_skyreels_diffusion_forcing_mask_runs_dense():
    # num_frame_per_block > 1 hands attn1 a block-causal mask: SLA has none, so every call is diffusers' own.
    model = FAMILIES["skyreels-v2"].build()
    model.register_to_config(num_frame_per_block=2)
    inputs = _wan_inputs()
    ref = _run(model, inputs)
    sagesla.patch(model, topk=0.5)
    assert torch.equal(_run(model, inputs), ref)
    assert all(p.last_fallback.startswith("an attention mask was given") for p in sla_processors(model).values())


# -- Wan-Animate-2: its self-attention stays dense ----------------------------------------------------------------


def _animate_2() -> tuple[torch.nn.Module, dict]:
    if not hasattr(diffusers, "WanAnimate2Transformer3DModel"):
        pytest.skip(f"diffusers {diffusers.__version__} has no Wan-Animate-2")
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    config = {
        "patch_size": (1, 2, 2),
        "text_len": 16,
        "in_dim": 36,
        "dim": 128,
        "ffn_dim": 128,
        "freq_dim": 32,
        "text_dim": 32,
        "out_dim": 16,
        "num_heads": 2,
        "num_layers": 2,
    }
    model = diffusers.WanAnimate2Transformer3DModel(**config).eval()
    # The reference pass ("extract"): dense unmasked self-attention over 2 latent frames of 8 x 8 (32 tokens).
    inputs = {
        "hidden_states": [torch.randn(16, 2, 8, 8)],
        "timestep": torch.tensor([1.0]),
        "encoder_hidden_states": [torch.randn(8, 32)],
        "condition_latents": [torch.randn(20, 2, 8, 8)],
        "encoder_hidden_states_image": torch.randn(1, 4, 1280),
        "kv_cache": WanAnimate2KVCache(2),
        "kv_cache_mode": "extract",
        "seq_len": 32,
        "offset_grid_sizes": torch.tensor([[2, 4, 4]]),
    }
    return model, inputs


def test_animate_2_self_attention_is_reported_skipped_and_untouched():
    model, inputs = _animate_2()
    ref = _run(model, inputs)
    processors = dict(model.attn_processors)
    report = sagesla.patch(model, topk=0.5)
    (reason,) = [entry.skipped for entry in diffusers_api.PROCESSORS if entry.name == "WanAnimate2AttnProcessor"]
    assert reason.startswith("WanAnimate2AttnProcessor attends through a flex BlockMask")
    assert report.replaced == {}
    assert report.skipped == dict.fromkeys(_blocks("blocks", "self_attn"), reason) | dict.fromkeys(
        _blocks("blocks", "cross_attn"), CROSS_ATTENTION
    )
    assert model.attn_processors == processors
    assert torch.equal(_run(model, inputs), ref)
    assert sagesla.unpatch(model) == []


# -- how a layer is chosen ------------------------------------------------------------------------------------------


def test_a_processor_sla_does_not_reproduce_is_reported_and_left_alone():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class Custom(WanAttnProcessor):
        """Could compute anything: only the exact Wan-family classes are served."""

    model = FAMILIES["wan-t2v"].build()
    model.blocks[0].attn1.set_processor(Custom())
    report = sagesla.patch(model, topk=0.5)
    assert report.replaced == {"blocks.1.attn1": 0.5}
    reason = report.skipped["blocks.0.attn1"]
    assert "Custom is not one SLA reproduces" in reason and "WanAttnProcessor" in reason
    assert type(model.blocks[0].attn1.processor) is Custom and not hasattr(model.blocks[0].attn1, "sla")


@pytest.mark.parametrize("model", ["HeliosTransformer3DModel", "FluxTransformer2DModel"])
def test_a_model_without_wan_family_attention_is_refused(model):
    # Helios' attention has Wan's shape, but its processor computes another RoPE and scales history keys; Flux's
    # attention does not have Wan's shape at all.
    configs = {
        "HeliosTransformer3DModel": {**TINY_WAN_CONFIG, "rope_dim": (22, 21, 21)},
        "FluxTransformer2DModel": {
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "axes_dims_rope": (4, 4, 8),
        },
    }
    config = {key: value for key, value in configs[model].items() if key != "rope_max_seq_len"}
    built = getattr(diffusers, model)(**config)
    with pytest.raises(TypeError, match="must be a diffusers model built of WanAttention layers or a relative's"):
        sagesla.patch(built, topk=0.5)
    assert not any(isinstance(p, SLAWanAttnProcessor) for p in built.attn_processors.values())


def test_the_sla_processor_refuses_a_processor_it_does_not_reproduce():
    with pytest.raises(TypeError, match="SLAWanAttnProcessor reproduces .* only, got builtins.object"):
        SLAWanAttnProcessor(object(), "blocks.0.attn1")


# -- the diffusers internals the patcher relies on -------------------------------------------------------------------


@pytest.mark.parametrize(
    "module,attribute,since",
    diffusers_api.names(),
    ids=[f"{m.rsplit('.', 1)[-1]}.{a}" for m, a, _ in diffusers_api.names()],
)
def test_every_listed_diffusers_name_is_where_the_patcher_looks(module, attribute, since):
    version = diffusers_api.installed_version()
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError:
        if since is not None and version < since:
            pytest.skip(f"{module} arrived in diffusers {since[0]}.{since[1]}")
        pytest.fail(f"diffusers {version} moved {module} (sagesla/patching/diffusers_api.py lists it)")
    assert hasattr(found, attribute), f"diffusers {version} moved {module}.{attribute} (listed in diffusers_api.py)"


def test_resolve_lists_every_moved_name(monkeypatch):
    moved = diffusers_api.Processor("transformer_wan", "NoSuchProcessor", (0, 35), "_no_such_helper")
    absent = diffusers_api.Processor("transformer_from_the_future", "FutureProcessor", (99, 0), "_get_qkv_projections")
    monkeypatch.setattr(diffusers_api, "PROCESSORS", (*diffusers_api.PROCESSORS, moved, absent))
    with pytest.raises(ImportError) as error:
        diffusers_api.resolve()
    message = str(error.value)
    assert "transformer_wan.NoSuchProcessor" in message and "transformer_wan._no_such_helper" in message
    assert "transformer_from_the_future" not in message  # a model newer than the installed diffusers is no problem
    assert f"tested with diffusers{diffusers_api.TESTED_DIFFUSERS}" in message
    gone = dataclasses.replace(absent, since=(0, 1))  # ... but one that should be there is
    monkeypatch.setattr(diffusers_api, "PROCESSORS", (*diffusers_api.PROCESSORS[:-2], gone))
    with pytest.raises(ImportError, match="transformer_from_the_future"):
        diffusers_api.resolve()


def test_every_model_of_the_processor_table_is_tested_here():
    listed = {model for entry in diffusers_api.PROCESSORS for model in entry.models}
    assert listed == {family.model for family in FAMILIES.values()} | {"WanAnimate2Transformer3DModel"}


def test_the_layers_and_processors_have_the_attributes_the_patcher_reads(family):
    api = diffusers_api.resolve()
    model = family.build()
    missing = [name for name in diffusers_api.MODEL_ATTRIBUTES if not hasattr(model, name)]
    for name in family.self_attention:
        layer = model.get_submodule(name)
        missing += [f"{name}.{a}" for a in diffusers_api.LAYER_ATTRIBUTES if not hasattr(layer, a)]
        missing += [f"{name}.{a}" for a in diffusers_api.OPTIONAL_LAYER_ATTRIBUTES if not hasattr(layer, a)]
        missing += [
            f"{name}.processor.{a}" for a in diffusers_api.PROCESSOR_ATTRIBUTES if not hasattr(layer.processor, a)
        ]
        assert type(layer.processor) in api.served and type(layer)._default_processor_cls is type(layer.processor)
        assert layer.add_k_proj is None and not layer.is_cross_attention
    assert not missing, f"diffusers {diffusers_api.installed_version()} moved attributes the patcher reads: {missing}"


def test_the_parallel_configs_have_the_attributes_the_processor_reads():
    api = diffusers_api.resolve()
    for name, attributes in diffusers_api.PARALLEL_CONFIG_ATTRIBUTES.items():
        fields = {field.name for field in dataclasses.fields(api.core[name])}
        assert set(attributes) <= fields, f"diffusers moved {name}.{sorted(set(attributes) - fields)}"


def test_pyproject_states_the_tested_diffusers_releases():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    for extra in ("diffusers", "dev"):
        assert f"diffusers{diffusers_api.TESTED_DIFFUSERS}" in extras[extra]
    assert diffusers_api.is_tested(diffusers_api.installed_version()), (
        f"diffusers {diffusers.__version__} is outside the tested diffusers{diffusers_api.TESTED_DIFFUSERS}: run "
        "these tests and update TESTED_FROM / TESTED_BELOW and pyproject.toml"
    )


def test_an_untested_diffusers_is_warned_about(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="sagesla"):
        diffusers_api.warn_if_untested()
        assert not caplog.records
        monkeypatch.setattr(diffusers_api, "installed_version", lambda: (9, 0))
        diffusers_api.warn_if_untested()
    assert caplog.records[0].getMessage().startswith("sagesla: diffusers 9.0 is outside the releases sagesla.patch")
