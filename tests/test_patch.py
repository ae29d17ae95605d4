"""sagesla.patch / unpatch on a tiny diffusers WanTransformer3DModel: SLA in attn1, dense fallback, exact undo."""

import copy
import importlib.util
import logging
import types

import pytest
import torch

import sagesla
from sagesla.testing import assert_close, first_attn1_output, sla_processors
from sagesla.wan_shapes import run_wan, wan_inputs

pytest.importorskip("diffusers")

from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

# rel-L1 against the unpatched model with topk=1.0 and zero proj_l, measured over seeds 0-3 on the CPU torch
# backend: SageSLA (INT8 Q/K, FP8 P/V) 1.2e-2 to 1.4e-2 at the first attn1 output, 3.2e-4 to 3.6e-4 at the model
# output; SLA in bf16 1.1e-3 to 1.3e-3 and 3.0e-5 to 3.1e-5.
LAYER_TOL = {True: 3e-2, False: 4e-3}
MODEL_TOL = {True: 1e-3, False: 1e-4}
# Tokens of wan_inputs(): 256, i.e. 4 key blocks of 64 on CPU.
LAYERS = ["blocks.0.attn1", "blocks.1.attn1"]
CROSS = ["blocks.0.attn2", "blocks.1.attn2"]


def test_report_and_submodules(tiny_wan):
    processors = dict(tiny_wan.attn_processors)
    report = sagesla.patch(tiny_wan, topk=0.25)
    assert report.replaced == dict.fromkeys(LAYERS, 0.25)
    assert report.skipped == dict.fromkeys(CROSS, "cross-attention (text/image keys) stays dense")
    assert report.attention == "SageSparseLinearAttention" and report.backend == "auto"
    assert str(report).splitlines() == [
        "sagesla.patch: 2 layer(s) -> SageSparseLinearAttention (backend='auto')",
        "  replaced 2, topk 0.25: blocks.0.attn1, blocks.1.attn1",
        "  skipped 2, cross-attention (text/image keys) stays dense: blocks.0.attn2, blocks.1.attn2",
    ]
    sla_keys = [key for key in tiny_wan.state_dict() if ".sla." in key]
    assert sla_keys == [f"{layer}.sla.proj_l.{p}" for layer in LAYERS for p in ("weight", "bias")]
    for block in tiny_wan.blocks:
        assert block.attn1.sla.tensor_layout == "NHD" and block.attn1.sla.head_dim == 64
    for name in CROSS:
        assert tiny_wan.get_submodule(name).processor is processors[f"{name}.processor"]
        assert type(processors[f"{name}.processor"]) is WanAttnProcessor
        assert not hasattr(tiny_wan.get_submodule(name), "sla")
    for name, processor in sla_processors(tiny_wan).items():
        assert processor.original is processors[name]


@pytest.mark.parametrize("quantized", [True, False], ids=["SageSLA", "SLA"])
def test_topk_one_matches_dense_within_quantization(tiny_wan, quantized):
    inputs = wan_inputs()
    ref_model, ref_layer = first_attn1_output(tiny_wan, inputs)
    sagesla.patch(tiny_wan, topk=1.0, quantized=quantized, backend="torch")
    out_model, out_layer = first_attn1_output(tiny_wan, inputs)
    for processor in sla_processors(tiny_wan).values():
        assert processor.last_fallback is None and processor.last_sparsity == 0.0
    # SLA ran (not a silent dense fallback), within its quantization / bf16 error.
    assert not torch.equal(out_layer, ref_layer)
    assert_close("attn1", ref_layer, out_layer, LAYER_TOL[quantized])
    assert_close("model", ref_model, out_model, MODEL_TOL[quantized])


def test_topk_below_one_runs_and_reports_sparsity(tiny_wan):
    inputs = wan_inputs()
    _, ref_layer = first_attn1_output(tiny_wan, inputs)
    profile = {"blocks.0.attn1": 0.25, "blocks.1.attn1": 0.5}
    report = sagesla.patch(tiny_wan, profile=profile)
    assert report.replaced == profile
    assert "replaced 1, topk 0.25: blocks.0.attn1" in str(report)
    out, out_layer = first_attn1_output(tiny_wan, inputs)
    assert torch.isfinite(out).all()
    # 4 key blocks: topk 0.25 keeps 1 (skips 3/4), 0.5 keeps 2.
    assert {name: p.last_sparsity for name, p in sla_processors(tiny_wan).items()} == {
        "blocks.0.attn1.processor": 0.75,
        "blocks.1.attn1.processor": 0.5,
    }
    # Skipping blocks changes the attention by far more than quantization does.
    with pytest.raises(AssertionError, match="rel-L1"):
        assert_close("attn1", ref_layer, out_layer, 10 * LAYER_TOL[True])


def test_dense_fallback_for_short_sequence_equals_diffusers_exactly(tiny_wan, caplog):
    # 2 x 8 x 8 latent -> 32 tokens, shorter than one block: diffusers' own attention on diffusers' q, k, v.
    inputs = wan_inputs(frames=2, size=8)
    ref = run_wan(tiny_wan, inputs)
    sagesla.patch(tiny_wan, topk=0.5)
    with caplog.at_level(logging.WARNING, logger="sagesla"):
        outs = [run_wan(tiny_wan, inputs) for _ in range(2)]
    assert all(torch.equal(out, ref) for out in outs)
    reason = "sequence length 32 is shorter than one 128x64 block"
    assert [record.getMessage() for record in caplog.records] == [
        f"sagesla: {layer} runs dense attention: {reason}" for layer in LAYERS
    ]
    assert all(p.last_fallback == reason and p.last_sparsity == 0.0 for p in sla_processors(tiny_wan).values())


def test_dense_fallback_for_attention_mask_equals_diffusers_exactly(tiny_wan, caplog):
    latent = wan_inputs()[0]
    attn = tiny_wan.blocks[0].attn1
    rotary_emb = tiny_wan.rope(latent)
    hidden = torch.randn(1, 256, 128)
    mask = torch.rand(1, 1, 256, 256) > 0.3
    with torch.no_grad():
        ref = attn(hidden, None, mask, rotary_emb)
        sagesla.patch(tiny_wan, topk=0.5)
        with caplog.at_level(logging.WARNING, logger="sagesla"):
            out = attn(hidden, None, mask, rotary_emb)
            unmasked = attn(hidden, None, None, rotary_emb)
    assert torch.equal(out, ref)
    assert not torch.equal(unmasked, ref)
    assert [record.getMessage() for record in caplog.records] == [
        "sagesla: blocks.0.attn1 runs dense attention: an attention mask was given (SLA attends without masks)"
    ]


def test_dense_fallback_when_forced_triton_cannot_serve(tiny_wan, caplog, monkeypatch):
    # Without the interpreter, Triton cannot run on CPU tensors: backend="triton" falls back instead of raising.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = wan_inputs()
    ref = run_wan(tiny_wan, inputs)
    sagesla.patch(tiny_wan, topk=0.5, backend="triton")
    with caplog.at_level(logging.WARNING, logger="sagesla"):
        out = run_wan(tiny_wan, inputs)
    assert torch.equal(out, ref)
    assert "backend='triton' cannot serve it: the kernels need CUDA tensors, got cpu" in caplog.records[0].getMessage()


def test_dense_fallback_for_head_dim_triton_cannot_serve(monkeypatch, caplog):
    from diffusers import WanTransformer3DModel

    from sagesla.wan_shapes import TINY_WAN_CONFIG

    # Under the interpreter CPU tensors are fine for Triton, so the head_dim limit is what stops it.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = WanTransformer3DModel(**{**TINY_WAN_CONFIG, "attention_head_dim": 320}).eval()
    inputs = wan_inputs()
    ref = run_wan(model, inputs)
    sagesla.patch(model, topk=0.5, backend="triton")
    with caplog.at_level(logging.WARNING, logger="sagesla"):
        assert torch.equal(run_wan(model, inputs), ref)
    assert caplog.records[0].getMessage().endswith("backend='triton' cannot serve it: head_dim 320 > 256")


def test_dense_fallback_for_float64(tiny_wan):
    tiny_wan.double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in wan_inputs())
    ref = run_wan(tiny_wan, inputs)
    sagesla.patch(tiny_wan, topk=0.5)
    assert torch.equal(run_wan(tiny_wan, inputs), ref)
    assert all("dtype torch.float64" in p.last_fallback for p in sla_processors(tiny_wan).values())


def test_non_finite_input_takes_the_fallback_with_check_finite(tiny_wan, caplog):
    inputs = wan_inputs()
    inputs[0][0, :, 1, 3, 5] = float("nan")
    ref = run_wan(tiny_wan, inputs)
    sagesla.patch(tiny_wan, topk=0.5, check_finite=True)
    with caplog.at_level(logging.WARNING, logger="sagesla"):
        out = run_wan(tiny_wan, inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert all(p.last_fallback == "query, key or value holds NaN/Inf" for p in sla_processors(tiny_wan).values())
    assert len(caplog.records) == 2
    # Finite inputs still run SLA.
    run_wan(tiny_wan, wan_inputs())
    assert all(p.last_fallback is None for p in sla_processors(tiny_wan).values())


def test_non_finite_input_without_check_finite_gives_nan_not_finite_garbage(tiny_wan):
    inputs = wan_inputs()
    inputs[0][0, :, 1, 3, 5] = float("nan")
    ref = run_wan(tiny_wan, inputs)
    sagesla.patch(tiny_wan, topk=0.5)
    out = run_wan(tiny_wan, inputs)
    assert all(p.last_fallback is None for p in sla_processors(tiny_wan).values())
    assert torch.isnan(out[torch.isnan(ref)]).all()


def test_unpatch_restores_exactly(tiny_wan):
    inputs = wan_inputs()
    ref = run_wan(tiny_wan, inputs)
    state = copy.deepcopy(tiny_wan.state_dict())
    processors = dict(tiny_wan.attn_processors)
    sagesla.patch(tiny_wan, topk=0.5)
    with torch.no_grad():
        tiny_wan.blocks[0].attn1.sla.proj_l.weight.normal_()
    assert not torch.equal(run_wan(tiny_wan, inputs), ref)
    assert sagesla.unpatch(tiny_wan) == LAYERS
    assert torch.equal(run_wan(tiny_wan, inputs), ref)
    assert tiny_wan.attn_processors == processors
    assert list(tiny_wan.state_dict()) == list(state)
    assert all(not hasattr(block.attn1, "sla") for block in tiny_wan.blocks)
    assert sagesla.unpatch(tiny_wan) == []


def test_patch_twice_skips_patched_layers(tiny_wan):
    sagesla.patch(tiny_wan, topk=0.5)
    report = sagesla.patch(tiny_wan, topk=0.1)
    assert report.replaced == {}
    assert set(report.skipped) == set(LAYERS + CROSS)
    assert report.skipped["blocks.0.attn1"].startswith("already patched")
    assert tiny_wan.blocks[0].attn1.sla.topk == 0.5


def test_pipeline_with_two_transformers(tiny_wan):
    from sagesla.wan_shapes import tiny_wan_transformer

    pipe = types.SimpleNamespace(transformer=tiny_wan, transformer_2=tiny_wan_transformer(), vae=torch.nn.Linear(2, 2))
    inputs = wan_inputs()
    refs = [run_wan(model, inputs) for model in (pipe.transformer, pipe.transformer_2)]
    profile = {f"{component}.{layer}": 0.5 for component in ("transformer", "transformer_2") for layer in LAYERS}
    report = sagesla.patch(pipe, profile=profile)
    assert report.replaced == profile
    assert set(report.skipped) == {f"{c}.{layer}" for c in ("transformer", "transformer_2") for layer in CROSS}
    assert len(sla_processors(pipe.transformer)) == len(sla_processors(pipe.transformer_2)) == 2
    assert sla_processors(pipe.transformer_2)["blocks.1.attn1.processor"].layer_name == "transformer_2.blocks.1.attn1"
    assert len(sagesla.unpatch(pipe)) == 4
    assert torch.equal(run_wan(pipe.transformer, inputs), refs[0])
    assert torch.equal(run_wan(pipe.transformer_2, inputs), refs[1])


def test_pipeline_with_one_transformer_twice_patches_it_once(tiny_wan):
    report = sagesla.patch(types.SimpleNamespace(transformer=tiny_wan, transformer_2=tiny_wan), topk=0.5)
    assert list(report.replaced) == ["transformer.blocks.0.attn1", "transformer.blocks.1.attn1"]


def test_attention_backend_reaches_the_dense_path(tiny_wan):
    sagesla.patch(tiny_wan, topk=0.5)
    tiny_wan.set_attention_backend("native")
    processor = tiny_wan.blocks[0].attn1.processor
    assert processor._attention_backend == processor.original._attention_backend == "native"
    sagesla.unpatch(tiny_wan)
    assert tiny_wan.blocks[0].attn1.processor._attention_backend == "native"


def test_cross_attention_call_goes_to_the_original_processor(tiny_wan):
    attn = tiny_wan.blocks[0].attn1
    hidden, context = torch.randn(1, 256, 128), torch.randn(1, 8, 128)
    with torch.no_grad():
        ref = attn(hidden, context)
        sagesla.patch(tiny_wan, topk=0.5)
        assert torch.equal(attn(hidden, context), ref)
    assert "cross-attention" in attn.processor.last_fallback


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({}, ValueError, r"give exactly one of `topk` .* or `profile` .*, got neither"),
        ({"topk": 0.5, "profile": {}}, ValueError, r"exactly one of .*got both"),
        ({"topk": 0.0}, ValueError, r"`topk` must be in \(0, 1\].*got 0.0"),
        ({"topk": "0.1"}, TypeError, r"`topk` must be a float in \(0, 1\], got str"),
        ({"profile": [0.5, 0.5]}, TypeError, r"`profile` must be a mapping \{layer name: topk\}, got list"),
        (
            {"profile": {"blocks.0.attn1": 0.5, "blocks.0.attn2": 0.5, "blocks.9.attn1": 0.1}},
            ValueError,
            r"missing \['blocks.1.attn1'\], unknown \['blocks.0.attn2', 'blocks.9.attn1'\]",
        ),
        (
            {"profile": {"blocks.0.attn1": 0.5, "blocks.1.attn1": 2.0}},
            ValueError,
            r"`profile\['blocks.1.attn1'\]` must be in \(0, 1\].*got 2.0",
        ),
        ({"topk": 0.5, "quantized": 1}, TypeError, r"`quantized` must be a bool, got int 1"),
        ({"topk": 0.5, "check_finite": "yes"}, TypeError, r"`check_finite` must be a bool, got str 'yes'"),
        ({"topk": 0.5, "backend": "cuda"}, ValueError, r"`backend` must be one of \('auto', 'torch', 'triton'\)"),
        ({"topk": 0.5, "linear_scope": "x"}, ValueError, r"`linear_scope` must be one of \('all', 'complement'\)"),
        ({"topk": 0.5, "feature_map": "hedgehog"}, ValueError, r"`feature_map` must be one of"),
        ({"topk": 0.5, "block_q": 0}, ValueError, r"`block_q` must be a positive int .*got 0"),
        ({"topk": 0.5, "block_k": 64.0}, ValueError, r"`block_k` must be a positive int .*got 64.0"),
    ],
    ids=lambda x: None,
)
def test_bad_arguments(tiny_wan, kwargs, error, message):
    state = dict(tiny_wan.state_dict())
    with pytest.raises(error, match=message):
        sagesla.patch(tiny_wan, **kwargs)
    assert list(tiny_wan.state_dict()) == list(state)
    assert not sla_processors(tiny_wan)


@pytest.mark.parametrize(
    "target,message",
    [
        (object(), r"`model_or_pipeline` must be a diffusers video transformer .* or a pipeline .* got object"),
        (torch.nn.Linear(2, 2), r"`model_or_pipeline` must be a diffusers video transformer whose .*got Linear"),
        (types.SimpleNamespace(transformer="x"), r"`model_or_pipeline.transformer` must be a torch.nn.Module, got str"),
        (
            types.SimpleNamespace(transformer=torch.nn.Linear(2, 2)),
            r"`model_or_pipeline.transformer` must be a diffusers video transformer whose .*got Linear",
        ),
    ],
    ids=["object", "linear", "pipeline-str", "pipeline-linear"],
)
def test_bad_targets(target, message):
    with pytest.raises(TypeError, match=message):
        sagesla.patch(target, topk=0.5)


def test_missing_diffusers_raises_with_install_hint(tiny_wan, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install 'sagesla\[diffusers\]'"):
        sagesla.patch(tiny_wan, topk=0.5)


def test_readme_example_runs(run_readme_example):
    printed = run_readme_example("## Patch a model")
    assert "replaced 2, topk 0.25: blocks.0.attn1, blocks.1.attn1" in printed and "\n0.75\n" in printed
