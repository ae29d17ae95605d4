"""SageSLAConfig + apply_sage_sla / remove_sage_sla: the config form of sagesla.patch / unpatch."""

import copy
import dataclasses
import re

import pytest
import torch

import sagesla
from sagesla import SageSLAConfig, SLASettings, apply_sage_sla, remove_sage_sla
from sagesla.patching import PRESETS
from sagesla.wan_shapes import run_wan, wan_inputs


def patch_error(**keywords) -> tuple[type, str]:
    """(type, message) of the error sagesla.patch raises for ``keywords`` (raised before it looks at the model)."""
    with pytest.raises((TypeError, ValueError)) as info:
        sagesla.patch(torch.nn.Linear(1, 1), **keywords)
    return info.type, str(info.value)


@pytest.mark.parametrize(
    "keywords",
    [
        {"topk": 2},
        {"topk": 0.0},
        {"topk": "0.1"},
        {"topk": 0.1, "profile": {"blocks.0.attn1": 0.1}},
        {},
        {"profile": [0.1]},
        {"topk": 0.1, "check_finite": 1},
        {"topk": 0.1, "dense_steps": (2.0, 1.0)},
        {"topk": 0.1, "dense_steps": []},
        {"topk": 0.1, "dense_steps": "first"},
        {"topk": 0.1, "settings": {"quantized": False}},
    ],
)
def test_validation_is_patchs(keywords):
    kind, message = patch_error(**keywords)
    with pytest.raises(kind, match=re.escape(message)):
        SageSLAConfig(**keywords)


@pytest.mark.parametrize("dense_layers", ["blocks.0.attn1", {"blocks.0.attn1": 1}, 3, [1.5], [None]])
def test_dense_layers_kind_is_checked_when_built(dense_layers):
    with pytest.raises(TypeError, match="`dense_layers`"):
        SageSLAConfig(topk=0.1, dense_layers=dense_layers)


def test_topk_error_names_the_field():
    with pytest.raises(ValueError, match=r"^`topk` must be in \(0, 1\]"):
        SageSLAConfig(topk=2)


def test_profile_path_is_read_when_applied(tiny_wan, tmp_path):
    # Built: a path counts as a profile (both -> patch's message); the file is read by apply_sage_sla, as by patch.
    with pytest.raises(ValueError, match=re.escape(patch_error(topk=0.1, profile={})[1])):
        SageSLAConfig(topk=0.1, profile=tmp_path / "missing.profile.safetensors")
    config = SageSLAConfig(profile=tmp_path / "missing.profile.safetensors")
    assert config.profile == tmp_path / "missing.profile.safetensors"
    with pytest.raises(Exception) as expected:
        sagesla.patch(copy.deepcopy(tiny_wan), profile=config.profile)
    with pytest.raises(expected.type, match=re.escape(str(expected.value))):
        apply_sage_sla(tiny_wan, config)


def test_frozen_equal_hashable():
    config = SageSLAConfig(topk=0.1, dense_layers=iter([0, "blocks.1.attn1"]), dense_steps=(900, 1000))
    assert config.dense_layers == (0, "blocks.1.attn1") and config.dense_steps == ((900.0, 1000.0),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.topk = 0.2
    assert config == SageSLAConfig(topk=0.1, dense_layers=[0, "blocks.1.attn1"], dense_steps=[(900.0, 1000.0)])
    assert hash(config) == hash(SageSLAConfig(topk=0.1, dense_layers=(0, "blocks.1.attn1"), dense_steps=(900, 1000)))
    assert SageSLAConfig(topk=0.1).settings == SLASettings() == SageSLAConfig(topk=0.1, settings=None).settings
    assert SageSLAConfig(topk=0.1, dense_steps=None).dense_steps is None
    # A mapping profile is kept as a read-only copy, so such a config is not hashable.
    mapping = {"blocks.0.attn1": 0.1}
    config = SageSLAConfig(profile=mapping)
    mapping["blocks.0.attn1"] = 0.5
    assert config.profile == {"blocks.0.attn1": 0.1}
    with pytest.raises(TypeError):
        config.profile["blocks.0.attn1"] = 0.5
    with pytest.raises(TypeError):
        hash(config)


def test_presets():
    assert sorted(PRESETS) == ["wan2.1-1.3b-480p", "wan2.1-14b-720p"]
    for name, config in PRESETS.items():
        assert SageSLAConfig.preset(name) is config and config.topk == 0.05
    with pytest.raises(ValueError, match=re.escape("['wan2.1-1.3b-480p', 'wan2.1-14b-720p']")):
        SageSLAConfig.preset("wan2.2-a14b")


@pytest.mark.parametrize(
    "keywords",
    [
        {"topk": 0.5},
        {"topk": 0.25, "dense_layers": [1], "check_finite": True},
        {"profile": {"blocks.0.attn1": 0.5, "blocks.1.attn1": 0.25}, "dense_steps": (0.0, 100.0)},
        {"topk": 0.5, "dense_steps": [(400.0, 600.0)]},  # wan_inputs' timestep 500: dense, the unpatched output
        {"topk": 0.5, "settings": SLASettings(quantized=False, backend="torch", block_q=32)},
    ],
)
def test_apply_equals_patch(tiny_wan, keywords):
    inputs = wan_inputs()
    original = run_wan(tiny_wan, inputs)
    twin = copy.deepcopy(tiny_wan)
    report = apply_sage_sla(tiny_wan, SageSLAConfig(**keywords))
    assert report == sagesla.patch(twin, **keywords)
    out = run_wan(tiny_wan, inputs)
    assert torch.equal(out, run_wan(twin, inputs))
    assert tiny_wan.state_dict().keys() == twin.state_dict().keys()
    assert remove_sage_sla(tiny_wan) == sagesla.unpatch(twin) == list(report.replaced)
    assert torch.equal(run_wan(tiny_wan, inputs), original)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_applies_and_removes(tiny_wan, name):
    inputs = wan_inputs()
    processors = dict(tiny_wan.attn_processors)
    keys = list(tiny_wan.state_dict())
    original = run_wan(tiny_wan, inputs)
    report = apply_sage_sla(tiny_wan, SageSLAConfig.preset(name))
    assert report.replaced == {"blocks.0.attn1": 0.05, "blocks.1.attn1": 0.05}
    assert not torch.equal(run_wan(tiny_wan, inputs), original)
    remove_sage_sla(tiny_wan)
    assert tiny_wan.attn_processors == processors and list(tiny_wan.state_dict()) == keys
    assert torch.equal(run_wan(tiny_wan, inputs), original)


def test_apply_checks_what_needs_the_model(tiny_wan):
    with pytest.raises(ValueError) as expected:
        sagesla.patch(copy.deepcopy(tiny_wan), topk=0.1, dense_layers=[7])
    with pytest.raises(ValueError, match=re.escape(str(expected.value))):
        apply_sage_sla(tiny_wan, SageSLAConfig(topk=0.1, dense_layers=[7]))
    with pytest.raises(TypeError, match="`config` must be a sagesla.SageSLAConfig, got dict"):
        apply_sage_sla(tiny_wan, {"topk": 0.1})
    assert "sla" not in dict(tiny_wan.blocks[0].attn1.named_children())
