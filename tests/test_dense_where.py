"""sagesla.patch(..., dense_layers=..., dense_steps=...): diffusers' own attention in chosen layers and steps."""

import dataclasses
import types

import pytest
import torch

import sagesla
from sagesla.patching import dense_timesteps
from sagesla.profile import LayerSpec, Measurements, Profile, ProfileError, Selection
from sagesla.settings import SLASettings
from sagesla.testing import first_attn1_output, run_in_threads, sla_processors
from sagesla.wan_shapes import run_wan, tiny_wan_transformer, wan_inputs

pytest.importorskip("diffusers")

from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

from sagesla.patching.processor import DENSE_STEPS  # noqa: E402
from sagesla.patching.report import DENSE_LAYERS, PROFILE_DENSE  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ["blocks.0.attn1", "blocks.1.attn1"]
CROSS = ["blocks.0.attn2", "blocks.1.attn2"]
CROSS_REASON = "cross-attention (text/image keys) stays dense"


def at(inputs, timestep: float):
    """``wan_inputs()`` at another timestep."""
    latents, _, text = inputs
    return latents, torch.tensor([timestep]), text


def bucketed_profile(topk, layers=LAYERS) -> Profile:
    """A profile of the tiny model: topk [layer][bucket] for timesteps below / from 500 (measurements zero)."""
    candidates, nl, nb, heads = (0.05, 0.1, 0.25, 0.3, 0.5, 1.0), len(layers), 2, 2
    zero, head_zero = torch.zeros(nl, nb, len(candidates)), torch.zeros(nl, nb, len(candidates), heads)
    measurements = Measurements(
        "WanTransformer3DModel",
        tuple(LayerSpec(name, heads, 64) for name in layers),
        SLASettings(quantized=True, block_q=128, block_k=64, backend="auto", pv_precision="fp8"),
        candidates,
        (500.0,),
        calls=torch.ones(nl, nb, dtype=torch.int64),
        sparsity=zero,
        rel_l1_max=zero,
        rel_l1_mean=zero,
        cosine_min=zero + 1,
        cosine_mean=zero + 1,
        head_rel_l1_max=head_zero,
        head_rel_l1_mean=head_zero,
        head_cosine_min=head_zero + 1,
        head_cosine_mean=head_zero + 1,
    )
    topk = torch.tensor(topk, dtype=torch.float64)
    return Profile(
        measurements,
        Selection("rel_l1", 0.1),
        topk=topk,
        head_topk=topk.unsqueeze(-1).expand(nl, nb, heads).contiguous(),
        met=torch.ones(nl, nb, dtype=torch.bool),
    )


# -- dense_layers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dense_layers", [["blocks.0.attn1"], [0], (0, "blocks.0.attn1")], ids=["name", "index", "both"]
)
def test_dense_layer_is_left_as_it_is_and_computes_diffusers_attention(tiny_wan, dense_layers):
    inputs = wan_inputs()
    processors = dict(tiny_wan.attn_processors)
    ref = first_attn1_output(tiny_wan, inputs)[1]
    report = sagesla.patch(tiny_wan, topk=0.5, dense_layers=dense_layers)
    assert report.replaced == {"blocks.1.attn1": 0.5}
    assert report.skipped == {**dict.fromkeys(CROSS, CROSS_REASON), "blocks.0.attn1": "dense_layers"}
    assert report.dense_layers == ["blocks.0.attn1"]
    assert "  skipped 1, dense_layers: blocks.0.attn1" in str(report).splitlines()
    attn = tiny_wan.blocks[0].attn1
    assert attn.processor is processors["blocks.0.attn1.processor"] and type(attn.processor) is WanAttnProcessor
    assert not hasattr(attn, "sla") and list(sla_processors(tiny_wan)) == ["blocks.1.attn1.processor"]
    assert torch.equal(first_attn1_output(tiny_wan, inputs)[1], ref)


def test_every_layer_dense_is_the_unpatched_model(tiny_wan):
    inputs = wan_inputs()
    ref = run_wan(tiny_wan, inputs)
    report = sagesla.patch(tiny_wan, topk=0.1, dense_layers=range(2))
    assert report.replaced == {} and report.dense_layers == LAYERS
    assert torch.equal(run_wan(tiny_wan, inputs), ref)
    assert not tiny_wan._forward_pre_hooks
    assert sagesla.unpatch(tiny_wan) == []


def test_dense_layers_in_a_pipeline():
    """An index covers blocks[i] of each transformer; a name covers one layer."""
    pipe = types.SimpleNamespace(transformer=tiny_wan_transformer(), transformer_2=tiny_wan_transformer())
    report = sagesla.patch(pipe, topk=0.5, dense_layers=[0, "transformer_2.blocks.1.attn1"])
    assert report.dense_layers == [
        "transformer.blocks.0.attn1",
        "transformer_2.blocks.0.attn1",
        "transformer_2.blocks.1.attn1",
    ]
    assert list(report.replaced) == ["transformer.blocks.1.attn1"]
    assert not sla_processors(pipe.transformer_2)
    assert sagesla.unpatch(pipe) == ["transformer.blocks.1.attn1"]


def test_an_index_means_blocks_i_not_vace_blocks_i():
    from diffusers import WanVACETransformer3DModel

    from sagesla.wan_shapes import TINY_WAN_CONFIG

    model = WanVACETransformer3DModel(**TINY_WAN_CONFIG, vace_layers=[0, 1], vace_in_channels=48).eval()
    report = sagesla.patch(model, topk=0.5, dense_layers=[0, "vace_blocks.1.attn1"])
    assert report.dense_layers == ["blocks.0.attn1", "vace_blocks.1.attn1"]
    assert list(report.replaced) == ["blocks.1.attn1", "vace_blocks.0.attn1"]


def test_mapping_profile_need_not_name_dense_layers(tiny_wan):
    report = sagesla.patch(tiny_wan, profile={"blocks.1.attn1": 0.25}, dense_layers=[0])
    assert report.replaced == {"blocks.1.attn1": 0.25}
    sagesla.unpatch(tiny_wan)
    report = sagesla.patch(tiny_wan, profile={"blocks.0.attn1": 0.5, "blocks.1.attn1": 0.25}, dense_layers=[0])
    assert report.replaced == {"blocks.1.attn1": 0.25}


def test_naming_a_layer_patched_already_raises(tiny_wan):
    sagesla.patch(tiny_wan, topk=0.5, dense_layers=[1])
    with pytest.raises(ValueError, match=r"`dense_layers` names layer\(s\) patched already, .*\['blocks.0.attn1'\]"):
        sagesla.patch(tiny_wan, topk=0.5, dense_layers=[0])
    # Patching again while keeping block 1 dense is fine: it stays unpatched.
    report = sagesla.patch(tiny_wan, topk=0.5, dense_layers=[1])
    assert report.replaced == {} and report.dense_layers == ["blocks.1.attn1"]


# -- dense_steps ---------------------------------------------------------------------------------------------------


def test_dense_steps_run_the_unpatched_model_bit_for_bit_inside_the_range(tiny_wan):
    inputs = wan_inputs()
    refs = {t: run_wan(tiny_wan, at(inputs, t)) for t in (399.0, 400.0, 500.0, 600.0, 601.0)}
    report = sagesla.patch(tiny_wan, topk=0.5, dense_steps=(400, 600))
    assert report.dense_steps == ((400.0, 600.0),)
    assert str(report).splitlines()[-1] == (
        "  dense_steps: diffusers' own attention in every replaced layer where 400 <= t <= 600"
    )
    assert len(tiny_wan._forward_pre_hooks) == 1
    processors = list(sla_processors(tiny_wan).values())
    for t, ref in refs.items():
        out = run_wan(tiny_wan, at(inputs, t))
        dense = 400.0 <= t <= 600.0
        assert torch.equal(out, ref) == dense, t
        assert all(p.last_fallback == (DENSE_STEPS if dense else None) for p in processors), t
        assert all(p.last_sparsity == (0.0 if dense else 0.5) for p in processors), t


def test_several_ranges_and_dense_layers_together(tiny_wan):
    inputs = wan_inputs()
    refs = {t: run_wan(tiny_wan, at(inputs, t)) for t in (10.0, 500.0, 990.0)}
    ref_layer = first_attn1_output(tiny_wan, at(inputs, 500.0))[1]
    report = sagesla.patch(tiny_wan, topk=0.5, dense_layers=[0], dense_steps=[(900.0, float("inf")), (0, 20)])
    assert report.dense_steps == ((900.0, float("inf")), (0.0, 20.0))
    assert "where 900 <= t <= inf or 0 <= t <= 20" in str(report)
    assert torch.equal(run_wan(tiny_wan, at(inputs, 10.0)), refs[10.0])
    assert torch.equal(run_wan(tiny_wan, at(inputs, 990.0)), refs[990.0])
    assert not torch.equal(run_wan(tiny_wan, at(inputs, 500.0)), refs[500.0])
    # The dense layer is dense at every step.
    assert torch.equal(first_attn1_output(tiny_wan, at(inputs, 500.0))[1], ref_layer)


def test_a_call_outside_a_forward_runs_sla(tiny_wan):
    attn, hidden = tiny_wan.blocks[0].attn1, torch.randn(1, 256, 128)
    sagesla.patch(tiny_wan, topk=0.5, dense_steps=(0, 1000))
    with torch.no_grad():
        attn(hidden)
    assert attn.processor.last_fallback is None and attn.processor.last_sparsity == 0.5


def test_dense_timesteps_of_a_sampler_follow_its_steps(tiny_wan):
    """A sampling loop over a diffusers scheduler's timesteps: the first two steps and the last run dense."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(5)
    ranges = dense_timesteps(scheduler.timesteps, first=2, last=1)
    values = scheduler.timesteps.tolist()
    assert ranges == [(values[1], values[0]), (values[4], values[4])]
    latents, _, text = wan_inputs()
    refs = [run_wan(tiny_wan, (latents, t.expand(1), text)) for t in scheduler.timesteps]
    sagesla.patch(tiny_wan, topk=0.5, dense_steps=ranges)
    scheduler.set_timesteps(5)
    for i, t in enumerate(scheduler.timesteps):
        assert torch.equal(run_wan(tiny_wan, (latents, t.expand(1), text)), refs[i]) == (i in (0, 1, 4)), i


@pytest.mark.parametrize(
    "first,last,expected",
    [
        (0, 0, []),
        (2, 0, [(900.0, 999.0)]),
        (0, 2, [(100.0, 200.0)]),
        (1, 1, [(999.0, 999.0), (100.0, 100.0)]),
        (3, 2, [(100.0, 999.0)]),
        (5, 0, [(100.0, 999.0)]),
    ],
)
def test_dense_timesteps(first, last, expected):
    timesteps = [999, 900, 500, 200, 100]
    assert dense_timesteps(timesteps, first=first, last=last) == expected
    assert dense_timesteps(torch.tensor(timesteps, dtype=torch.float32), first=first, last=last) == expected
    assert dense_timesteps(torch.tensor(timesteps).numpy(), first=first, last=last) == expected
    assert dense_timesteps(timesteps[::-1], first=last, last=first) == expected[::-1]


@pytest.mark.parametrize(
    "timesteps,kwargs,error,message",
    [
        ([], {"first": 1}, ValueError, r"`timesteps` must hold at least one timestep"),
        ([1000, 500, 800], {"first": 1}, ValueError, r"`timesteps` must be monotone .*\[1000.0, 500.0, 800.0\]"),
        ("999", {"first": 1}, TypeError, r"`timesteps` must be a sequence or 1-D tensor of timesteps, got str"),
        ([1000, "x"], {"first": 1}, TypeError, r"`timesteps\[1\]` must be a timestep \(a real number\), got str 'x'"),
        ([1000, 500], {"first": 3}, ValueError, r"`first` must be an int in \[0, 2\] .*got int 3"),
        ([1000, 500], {"last": -1}, ValueError, r"`last` must be an int in \[0, 2\] .*got int -1"),
        ([1000, 500], {"first": 1.0}, ValueError, r"`first` must be an int in \[0, 2\] .*got float 1.0"),
    ],
    ids=lambda x: None,
)
def test_dense_timesteps_bad_arguments(timesteps, kwargs, error, message):
    with pytest.raises(error, match=message):
        dense_timesteps(timesteps, **kwargs)


# -- bad arguments -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (
            {"dense_layers": "blocks.0.attn1"},
            TypeError,
            r"`dense_layers` must be a list of layer names \(str, .*\) and / or block indices \(int\), got str",
        ),
        ({"dense_layers": 0}, TypeError, r"`dense_layers` must be a list of .*got int 0"),
        (
            {"dense_layers": [0.5, True]},
            TypeError,
            r"`dense_layers` entries must be .*got \[0.5, True\] \(bool, float\)",
        ),
        (
            {"dense_layers": [7, "blocks.0.attn2", "blocks.1.attn1", -1]},
            ValueError,
            r"`dense_layers` names no self-attention layer SLA serves: \[7, 'blocks.0.attn2', -1\]; the layers are "
            r"\['blocks.0.attn1', 'blocks.1.attn1'\] and the block indices 0-1",
        ),
        ({"dense_steps": 500}, TypeError, r"`dense_steps` must be a timestep range \(low, high\) .*got int 500"),
        ({"dense_steps": "500"}, TypeError, r"`dense_steps` must be a timestep range .*got str '500'"),
        ({"dense_steps": []}, ValueError, r"`dense_steps` must hold at least one range"),
        ({"dense_steps": (500,)}, ValueError, r"`dense_steps` must be a timestep range \(low, high\), .*got tuple"),
        ({"dense_steps": (600, 400)}, ValueError, r"`dense_steps` must be a range .*low <= high, got \(600.0, 400.0\)"),
        ({"dense_steps": (float("nan"), 400)}, ValueError, r"`dense_steps\[0\]` must be a timestep, got NaN"),
        ({"dense_steps": ("0", 400)}, TypeError, r"`dense_steps\[0\]` must be a timestep \(a real number\), got str"),
        (
            {"dense_steps": [(0, 10), (900, 1000, 1)]},
            ValueError,
            r"`dense_steps\[1\]` must be a timestep range \(low, high\), .*got tuple \(900, 1000, 1\)",
        ),
        ({"dense_steps": [(0, 10), (20, None)]}, TypeError, r"`dense_steps\[1\]\[1\]` must be a timestep .*NoneType"),
    ],
    ids=lambda x: None,
)
def test_bad_arguments(tiny_wan, kwargs, error, message):
    state = list(tiny_wan.state_dict())
    with pytest.raises(error, match=message):
        sagesla.patch(tiny_wan, topk=0.5, **kwargs)
    assert list(tiny_wan.state_dict()) == state
    assert not sla_processors(tiny_wan) and not tiny_wan._forward_pre_hooks


def test_dense_steps_accepts_tensors(tiny_wan):
    report = sagesla.patch(tiny_wan, topk=0.5, dense_steps=torch.tensor([[0.0, 10.0], [900.0, 1000.0]]))
    assert report.dense_steps == ((0.0, 10.0), (900.0, 1000.0))
    sagesla.unpatch(tiny_wan)
    report = sagesla.patch(tiny_wan, topk=0.5, dense_steps=(torch.tensor(900), torch.tensor(1000.0)))
    assert report.dense_steps == ((900.0, 1000.0),)


# -- unpatch -------------------------------------------------------------------------------------------------------


def test_unpatch_restores_everything(tiny_wan):
    inputs = wan_inputs()
    refs = {t: run_wan(tiny_wan, at(inputs, t)) for t in (100.0, 900.0)}
    processors = dict(tiny_wan.attn_processors)
    state = list(tiny_wan.state_dict())
    sagesla.patch(
        tiny_wan, profile=bucketed_profile([[0.1, 0.5], [0.3, 0.05]]), dense_layers=[1], dense_steps=(800, 1000)
    )
    assert len(tiny_wan._forward_pre_hooks) == 1
    assert sagesla.unpatch(tiny_wan) == ["blocks.0.attn1"]
    assert not tiny_wan._forward_pre_hooks
    assert tiny_wan.attn_processors == processors and list(tiny_wan.state_dict()) == state
    for t, ref in refs.items():
        assert torch.equal(run_wan(tiny_wan, at(inputs, t)), ref)


# -- profiles ------------------------------------------------------------------------------------------------------


def test_bucketed_profile_with_dense_steps_and_layers_shares_one_tracker(tiny_wan):
    """dense_* win over the profile: a dense step is the unpatched model, others take their bucket's topk."""
    inputs = wan_inputs()  # 256 tokens: 4 key blocks of 64
    refs = {t: run_wan(tiny_wan, at(inputs, t)) for t in (100.0, 600.0, 900.0)}
    report = sagesla.patch(
        tiny_wan, profile=bucketed_profile([[0.25, 0.5], [0.3, 0.05]]), dense_layers=[1], dense_steps=(800, 1000)
    )
    assert report.replaced == {"blocks.0.attn1": 0.5} and report.dense_layers == ["blocks.1.attn1"]
    assert len(tiny_wan._forward_pre_hooks) == 1
    processor = tiny_wan.blocks[0].attn1.processor
    assert processor.timesteps.edges == (500.0,) and processor.timesteps.dense_ranges == ((800.0, 1000.0),)
    for t, sparsity in ((100.0, 3 / 4), (600.0, 2 / 4), (900.0, 0.0)):
        out = run_wan(tiny_wan, at(inputs, t))
        assert processor.last_sparsity == sparsity, t
        assert torch.equal(out, refs[t]) == (t == 900.0), t


def test_profile_without_the_dense_layers_fits_only_with_them_dense(tiny_wan):
    """A profile calibrated with block 1 dense has no entry for it: patch accepts it when block 1 stays dense."""
    profile = bucketed_profile([[0.25, 0.5]], layers=["blocks.0.attn1"])
    with pytest.raises(ProfileError, match=r"layer 'blocks.1.attn1': in the model, not in the profile"):
        sagesla.patch(tiny_wan, profile=profile)
    report = sagesla.patch(tiny_wan, profile=profile, dense_layers=["blocks.1.attn1"])
    assert report.replaced == {"blocks.0.attn1": 0.5}


def test_dense_layers_naming_a_profile_dense_layer_keep_their_reason(tiny_wan):
    profile = bucketed_profile([[1.0, 1.0], [0.3, 1.0]])
    report = sagesla.patch(tiny_wan, profile=profile, dense_layers=profile.dense_layers())
    assert report.dense_layers == ["blocks.0.attn1"] and report.replaced == {"blocks.1.attn1": 1.0}
    assert report.skipped["blocks.0.attn1"] == DENSE_LAYERS


def test_profile_layers_at_topk_one_in_every_bucket_run_diffusers_attention(tiny_wan):
    """blocks.0 keeps every key block in both buckets: left unpatched. blocks.1 is at 1.0 from t = 500 only: it
    runs SLA below, and diffusers' attention from t = 500 (the whole model is then the unpatched one)."""
    inputs = wan_inputs()
    processors = dict(tiny_wan.attn_processors)
    refs = {t: first_attn1_output(tiny_wan, at(inputs, t)) for t in (100.0, 600.0)}
    profile = bucketed_profile([[1.0, 1.0], [0.25, 1.0]])
    report = sagesla.patch(tiny_wan, profile=profile)
    assert report.replaced == {"blocks.1.attn1": 1.0} and report.dense_layers == ["blocks.0.attn1"]
    assert report.skipped == {**dict.fromkeys(CROSS, CROSS_REASON), "blocks.0.attn1": PROFILE_DENSE}
    assert f"  skipped 1, {PROFILE_DENSE}: blocks.0.attn1" in str(report).splitlines()
    attn = tiny_wan.blocks[0].attn1
    assert attn.processor is processors["blocks.0.attn1.processor"] and type(attn.processor) is WanAttnProcessor
    assert not hasattr(attn, "sla") and list(sla_processors(tiny_wan)) == ["blocks.1.attn1.processor"]
    processor = tiny_wan.blocks[1].attn1.processor
    for t, sparsity in ((100.0, 3 / 4), (600.0, 0.0)):
        out, first = first_attn1_output(tiny_wan, at(inputs, t))
        assert torch.equal(first, refs[t][1]), t
        assert torch.equal(out, refs[t][0]) == (t == 600.0), t
        assert processor.last_sparsity == sparsity and processor.last_fallback is None, t
    assert sagesla.unpatch(tiny_wan) == ["blocks.1.attn1"]
    # The same through a SageSLAConfig, which goes through patch.
    report = sagesla.apply_sage_sla(tiny_wan, sagesla.SageSLAConfig(profile=profile))
    assert report.skipped["blocks.0.attn1"] == PROFILE_DENSE and list(report.replaced) == ["blocks.1.attn1"]


def test_profile_dense_in_every_layer_patches_nothing_and_says_so(tiny_wan):
    inputs = wan_inputs()
    processors = dict(tiny_wan.attn_processors)
    refs = {t: run_wan(tiny_wan, at(inputs, t)) for t in (100.0, 600.0)}
    profile = bucketed_profile([[1.0, 1.0], [1.0, 1.0]])
    # No candidate met the budget in blocks.1 below t = 500: it runs dense, not "the largest" candidate.
    profile = dataclasses.replace(profile, met=torch.tensor([[True, True], [False, True]]))
    report = sagesla.patch(tiny_wan, profile=profile)
    assert report.replaced == {} and report.dense_layers == LAYERS
    lines = str(report).splitlines()
    assert lines[0] == "sagesla.patch: 0 layer(s) -> SageSparseLinearAttention (backend='auto')"
    assert f"  skipped 2, {PROFILE_DENSE}: blocks.0.attn1, blocks.1.attn1" in lines
    assert not any("at no candidate" in note for note in report.notes)
    assert tiny_wan.attn_processors == processors and not tiny_wan._forward_pre_hooks
    for t, ref in refs.items():
        assert torch.equal(run_wan(tiny_wan, at(inputs, t)), ref), t
    assert sagesla.unpatch(tiny_wan) == []


def test_mapping_profile_at_topk_one_runs_sla_as_asked(tiny_wan):
    report = sagesla.patch(tiny_wan, profile={"blocks.0.attn1": 1.0, "blocks.1.attn1": 1.0})
    assert report.replaced == dict.fromkeys(LAYERS, 1.0) and report.dense_layers == []


# -- threads and torch.compile -------------------------------------------------------------------------------------


def test_threads_at_dense_and_sparse_timesteps_each_get_their_own(tiny_wan):
    inputs = wan_inputs()
    sagesla.patch(tiny_wan, topk=0.5, dense_steps=(800, 1000))
    timesteps = (100.0, 900.0)
    alone = {t: run_wan(tiny_wan, at(inputs, t)) for t in timesteps}
    assert not torch.equal(alone[100.0], alone[900.0])
    results = run_in_threads(lambda t: run_wan(tiny_wan, at(inputs, t)), timesteps)
    for t in timesteps:
        assert len(results[t]) == 4 and all(torch.equal(out, alone[t]) for out in results[t]), t


@pytest.mark.slow
def test_compiled_fullgraph_picks_dense_or_sparse_on_the_device(tiny_wan):
    """torch.compile(fullgraph=True): no graph break; at each timestep the graph gives eager's output bit for bit
    (aot_eager), the unpatched model's in a dense step, and follows the profile's buckets elsewhere."""
    inputs = wan_inputs()
    refs = {t: run_wan(tiny_wan, at(inputs, t)) for t in (100.0, 600.0, 900.0)}
    sagesla.patch(
        tiny_wan, profile=bucketed_profile([[0.25, 0.5], [0.3, 0.05]]), dense_steps=(800, 1000), backend="torch"
    )
    eager = {t: run_wan(tiny_wan, at(inputs, t)) for t in refs}

    def step(latents, timestep, text):
        return tiny_wan(latents, timestep, text, return_dict=False)[0]

    with torch.no_grad():
        explained = torch._dynamo.explain(step)(*at(inputs, 900.0))
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        for t in (900.0, 100.0, 600.0, 900.0):
            out = compiled(*at(inputs, t))
            assert torch.equal(out, eager[t]), t
            assert torch.equal(out, refs[t]) == (t == 900.0), t
