"""sagesla.patch on every diffusers video transformer family it serves, on tiny random models on CPU.

Each file of tests/model_families/ lists tiny models of one family (``FAMILIES``: id -> ``ModelFamily``); every test
here runs on each of them. At topk=1.0 (SLA, bf16, zero ``proj_l``, torch backend) a patched model is dense attention
up to 16-bit rounding: ``ModelFamily.tolerance`` bounds its rel-L1 against the unpatched model (1e-4; measured over
seeds 0-3: 1.9e-5 to 3.1e-5 for the Wan family), and topk=0.25 must move the output by more than ten times that.
"""

import copy
import pathlib

import pytest
import torch

import sagesla
from sagesla.testing import assert_close, attention_processors, load_families, run_model, sla_processors

pytest.importorskip("diffusers")

from sagesla.patching import diffusers_api  # noqa: E402

FAMILIES = load_families(pathlib.Path(__file__).parent / "model_families")


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def test_report_names_every_layer(family):
    model = family.build()
    report = sagesla.patch(model, topk=0.5, quantized=False, backend="torch")
    assert report.replaced == dict.fromkeys(family.self_attention, 0.5)
    assert report.skipped == family.skipped
    assert sorted(sla_processors(model)) == sorted(f"{name}.processor" for name in family.self_attention)
    for name in family.self_attention:
        layer = model.get_submodule(name)
        assert layer.sla.head_dim == layer.to_q.out_features // layer.heads
        assert type(layer.processor.original) in diffusers_api.resolve().served


def test_topk_one_matches_the_unpatched_model(family):
    model, inputs = family.build(), family.inputs()
    ref = run_model(model, inputs)
    sagesla.patch(model, topk=1.0, quantized=False, backend="torch")
    out = run_model(model, inputs)
    processors = sla_processors(model).values()
    assert len(processors) == len(family.self_attention)
    assert all(p.last_fallback is None and p.last_sparsity == 0.0 for p in processors)
    assert not torch.equal(out, ref)  # SLA ran, not a silent dense fallback
    assert_close(family.model, ref, out, family.tolerance)


def test_topk_below_one_skips_blocks_and_changes_the_output(family):
    model, inputs = family.build(), family.inputs()
    ref = run_model(model, inputs)
    sagesla.patch(model, topk=0.25, quantized=False, backend="torch")
    out = run_model(model, inputs)
    assert torch.isfinite(out).all()
    assert all(p.last_fallback is None and p.last_sparsity > 0.5 for p in sla_processors(model).values())
    with pytest.raises(AssertionError, match="rel-L1"):
        assert_close(family.model, ref, out, 10 * family.tolerance)


def test_dense_fallback_reproduces_diffusers_bit_for_bit(family):
    # Blocks longer than the sequence: every call runs the replaced processor's attention on the SLA processor's
    # q, k, v, so this checks the mirrored projections, QK-norm and RoPE of each family exactly.
    model, inputs = family.build(), family.inputs()
    ref = run_model(model, inputs)
    sagesla.patch(model, topk=0.5, quantized=False, backend="torch", block_q=512, block_k=512)
    assert torch.equal(run_model(model, inputs), ref)
    assert all("shorter than one 512x512 block" in p.last_fallback for p in sla_processors(model).values())


def test_unpatch_restores_the_never_patched_model_exactly(family):
    model, inputs = family.build(), family.inputs()
    never = copy.deepcopy(model)
    processors = attention_processors(model)
    keys = list(model.state_dict())
    sagesla.patch(model, topk=0.5)
    with torch.no_grad():
        model.get_submodule(family.self_attention[0]).sla.proj_l.weight.normal_()
    ref = run_model(never, inputs)
    assert not torch.equal(run_model(model, inputs), ref)
    assert sorted(sagesla.unpatch(model)) == sorted(family.self_attention)
    assert torch.equal(run_model(model, inputs), ref)
    assert attention_processors(model) == processors
    assert list(model.state_dict()) == keys
    assert not any(hasattr(model.get_submodule(name), "sla") for name in family.self_attention)


def test_the_layers_and_processors_have_the_attributes_the_patcher_reads(family):
    api = diffusers_api.resolve()
    model = family.build()
    missing = []
    for name in family.self_attention:
        layer = model.get_submodule(name)
        entry = api.served[type(layer.processor)]
        missing += [f"{name}.{a}" for a in diffusers_api.LAYER_ATTRIBUTES[entry.family] if not hasattr(layer, a)]
        missing += [
            f"{name}.processor.{a}"
            for a in diffusers_api.PROCESSOR_ATTRIBUTES[entry.family]
            if not hasattr(layer.processor, a)
        ]
    assert not missing, f"diffusers {diffusers_api.installed_version()} moved attributes the patcher reads: {missing}"


def test_every_model_of_the_processor_table_is_tested_here():
    listed = {model for entry in diffusers_api.PROCESSORS if entry.skipped is None for model in entry.models}
    assert listed == {family.model for family in FAMILIES.values()}
