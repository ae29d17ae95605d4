"""sagesla.patch on every diffusers Wan-family transformer (tiny random configs on CPU), and the diffusers internals
the patcher relies on (sagesla/patching/diffusers_api.py)."""

import dataclasses
import importlib
import logging
import pathlib

import pytest
import torch

import sagesla
from sagesla.testing import load_module, run_model, sla_processors
from sagesla.wan_shapes import TINY_WAN_CONFIG

diffusers = pytest.importorskip("diffusers")

from sagesla.patching import diffusers_api  # noqa: E402
from sagesla.patching.wan import CROSS_ATTENTION, SLAWanAttnProcessor  # noqa: E402

WAN = load_module(pathlib.Path(__file__).parent / "model_families" / "wan.py")
FAMILIES = WAN.FAMILIES


def test_skyreels_diffusion_forcing_mask_runs_dense():
    # num_frame_per_block > 1 hands attn1 a block-causal mask: SLA has none, so every call is diffusers' own.
    model = FAMILIES["skyreels-v2"].build()
    model.register_to_config(num_frame_per_block=2)
    inputs = WAN.wan_step_inputs()
    ref = run_model(model, inputs)
    sagesla.patch(model, topk=0.5)
    assert torch.equal(run_model(model, inputs), ref)
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
    ref = run_model(model, inputs)
    processors = dict(model.attn_processors)
    report = sagesla.patch(model, topk=0.5)
    (reason,) = [entry.skipped for entry in diffusers_api.PROCESSORS if entry.name == "WanAnimate2AttnProcessor"]
    assert reason.startswith("WanAnimate2AttnProcessor attends through a flex BlockMask")
    assert report.replaced == {}
    assert report.skipped == dict.fromkeys(WAN.blocks("blocks", "self_attn"), reason) | dict.fromkeys(
        WAN.blocks("blocks", "cross_attn"), CROSS_ATTENTION
    )
    assert model.attn_processors == processors
    assert torch.equal(run_model(model, inputs), ref)
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
    with pytest.raises(TypeError, match="must be a diffusers video transformer whose attention SLA serves"):
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
    if since is not None and version < since and not hasattr(found, attribute):
        pytest.skip(f"{module}.{attribute} arrived in diffusers {since[0]}.{since[1]}")
    assert hasattr(found, attribute), f"diffusers {version} moved {module}.{attribute} (listed in diffusers_api.py)"


def test_resolve_lists_every_moved_name(monkeypatch):
    moved = diffusers_api.Processor(
        "transformers.transformer_wan", "NoSuchProcessor", (0, 35), "wan", "_no_such_helper"
    )
    absent = diffusers_api.Processor(
        "transformers.transformer_from_the_future", "FutureProcessor", (99, 0), "wan", "_get_qkv_projections"
    )
    # a processor newer than the installed diffusers, in a module it has
    newer = diffusers_api.Processor("transformers.transformer_wan", "FutureWanProcessor", (99, 0), "wan")
    monkeypatch.setattr(diffusers_api, "PROCESSORS", (*diffusers_api.PROCESSORS, newer, moved, absent))
    with pytest.raises(ImportError) as error:
        diffusers_api.resolve()
    message = str(error.value)
    assert "transformer_wan.NoSuchProcessor" in message and "transformer_wan._no_such_helper" in message
    assert "transformer_from_the_future" not in message  # a model newer than the installed diffusers is no problem
    assert "FutureWanProcessor" not in message
    assert f"tested with diffusers{diffusers_api.TESTED_DIFFUSERS}" in message
    gone = dataclasses.replace(absent, since=(0, 1))  # ... but one that should be there is
    monkeypatch.setattr(diffusers_api, "PROCESSORS", (*diffusers_api.PROCESSORS[:-2], gone))
    with pytest.raises(ImportError, match="transformer_from_the_future"):
        diffusers_api.resolve()


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
