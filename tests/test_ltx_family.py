"""sagesla.patch on LTX-Video and LTX-2 beyond the generic family tests (tests/test_model_families.py): LTX-2's
interleaved RoPE and per-head gates, its masked video self-attention, cross-attention calls, and spatio-temporal
guidance under ``LTX2PerturbedAttnProcessor``."""

import dataclasses
import pathlib

import pytest
import torch

import sagesla
from sagesla.testing import assert_close, load_module, run_model, sla_processors

pytest.importorskip("diffusers")

from sagesla.patching.ltx import ALL_PERTURBED, SLALTX2PerturbedAttnProcessor  # noqa: E402
from sagesla.patching.processor import CROSS_CALL  # noqa: E402

LTX = load_module(pathlib.Path(__file__).parent / "model_families" / "ltx.py")
# tests/test_model_families.py's: rel-L1 of the model output at topk=1.0 (quantized=False, torch backend).
MODEL_TOL = 1e-4


def _ltx2(**config) -> sagesla.testing.ModelFamily:
    return dataclasses.replace(LTX.FAMILIES["ltx-2"], config={**LTX.LTX2_CONFIG, **config})


@pytest.mark.parametrize("rope_type", ["interleaved", "split"])
def test_ltx2_gated_attention_matches_at_topk_one_and_falls_back_bit_for_bit(rope_type):
    # LTX-2.3's layout: per-head gates 2 sigmoid(to_gate_logits(x)) on the attention output (random, not 1).
    family = _ltx2(rope_type=rope_type, gated_attn=True, audio_gated_attn=True)
    model, inputs = family.build(), family.inputs()
    assert model.transformer_blocks[0].attn1.to_gate_logits is not None
    ref = run_model(model, inputs)
    sagesla.patch(model, topk=1.0, quantized=False, backend="torch")
    out = run_model(model, inputs)
    assert all(p.last_fallback is None for p in sla_processors(model).values())
    assert not torch.equal(out, ref)
    assert_close(f"LTX-2 {rope_type} gated", ref, out, MODEL_TOL)
    sagesla.unpatch(model)
    sagesla.patch(model, topk=0.5, quantized=False, backend="torch", block_q=512, block_k=512)
    assert torch.equal(run_model(model, inputs), ref)


def test_ltx2_video_self_attention_mask_runs_dense_bit_for_bit():
    # IC-LoRA's multiplicative video self-attention mask reaches attn1: SLA has no masks, so each call is diffusers'.
    family = LTX.FAMILIES["ltx-2"]
    model, length = family.build(), LTX.FRAMES * LTX.HEIGHT * LTX.WIDTH
    mask = (torch.rand(1, length, length) > 0.3).float()
    inputs = family.inputs() | {"video_self_attention_mask": mask}
    ref = run_model(model, inputs)
    sagesla.patch(model, topk=0.5, quantized=False, backend="torch")
    assert torch.equal(run_model(model, inputs), ref)
    assert all(p.last_fallback.startswith("an attention mask was given") for p in sla_processors(model).values())


@pytest.mark.parametrize("family_id", ["ltx-video", "ltx-2", "ltx-2-perturbed"])
def test_a_cross_attention_call_runs_the_original_processor(family_id):
    family = LTX.FAMILIES[family_id]
    model = family.build()
    sagesla.patch(model, topk=0.5, quantized=False, backend="torch")
    layer = model.transformer_blocks[0].attn1
    hidden_states, context = torch.randn(1, 256, 128), torch.randn(1, 13, 128)
    with torch.no_grad():
        out = layer.processor(layer, hidden_states, context)
        ref = layer.processor.original(layer, hidden_states, context)
    assert torch.equal(out, ref)
    assert layer.processor.last_fallback == CROSS_CALL


def _batch_of(inputs: dict, size: int) -> dict:
    """The forward's keywords for ``size`` copies of each sample."""
    return {name: torch.cat([value] * size) if torch.is_tensor(value) else value for name, value in inputs.items()}


# Spatio-temporal guidance as the LTX-2 pipelines run it (a batch of the conditional and the perturbed pass) and the
# forward's other options: blocks and mask (B,), 0 perturbs a sample.
GUIDANCE = {
    "blend": (1, {"spatio_temporal_guidance_blocks": [1], "perturbation_mask": torch.tensor([0.25])}),
    "cond-and-perturbed": (
        2,
        {"spatio_temporal_guidance_blocks": [0, 1], "perturbation_mask": torch.tensor([1.0, 0.0])},
    ),
    "isolated-modalities": (
        1,
        {"spatio_temporal_guidance_blocks": [0], "perturbation_mask": torch.tensor([0.5]), "isolate_modalities": True},
    ),
}


@pytest.mark.parametrize("batch,guidance", GUIDANCE.values(), ids=GUIDANCE)
def test_ltx2_spatio_temporal_guidance_matches_at_topk_one_and_falls_back_bit_for_bit(batch, guidance):
    # LTX2PerturbedAttnProcessor blends the values with the attention output, lerp(v, attention, mask): SLA's output
    # takes the attention's place.
    family = LTX.FAMILIES["ltx-2-perturbed"]
    model, plain = family.build(), _batch_of(family.inputs(), batch)
    inputs = plain | guidance
    ref = run_model(model, inputs)
    assert not torch.equal(ref, run_model(model, plain))
    sagesla.patch(model, topk=1.0, quantized=False, backend="torch")
    out = run_model(model, inputs)
    processors = sla_processors(model).values()
    assert all(type(p) is SLALTX2PerturbedAttnProcessor and p.last_fallback is None for p in processors)
    assert not torch.equal(out, ref)
    assert_close("LTX-2 spatio-temporal guidance", ref, out, MODEL_TOL)
    sagesla.unpatch(model)
    sagesla.patch(model, topk=0.5, quantized=False, backend="torch", block_q=512, block_k=512)
    assert torch.equal(run_model(model, inputs), ref)


def test_ltx2_all_perturbed_forward_runs_no_attention_bit_for_bit():
    # Guidance in every block without a mask perturbs every sample: each attn1 computes the values alone, as the
    # replaced processor does, whatever topk.
    family = LTX.FAMILIES["ltx-2-perturbed"]
    model, inputs = family.build(), family.inputs() | {"spatio_temporal_guidance_blocks": [0, 1]}
    ref = run_model(model, inputs)
    sagesla.patch(model, topk=0.25, quantized=False, backend="torch")
    assert torch.equal(run_model(model, inputs), ref)
    assert all(p.last_fallback == ALL_PERTURBED for p in sla_processors(model).values())


@pytest.mark.parametrize("all_perturbed", [None, True])
def test_ltx2_all_perturbed_call_is_the_original_processors(all_perturbed):
    # all_perturbed None: told by the mask, as the replaced processor tells it.
    family = LTX.FAMILIES["ltx-2-perturbed"]
    model = family.build()
    sagesla.patch(model, topk=0.25, quantized=False, backend="torch")
    layer = model.transformer_blocks[0].attn1
    hidden_states, mask = torch.randn(2, 256, 128), torch.zeros(2, 1, 1)
    with torch.no_grad():
        out = layer.processor(layer, hidden_states, perturbation_mask=mask, all_perturbed=all_perturbed)
        ref = layer.processor.original(layer, hidden_states, perturbation_mask=mask, all_perturbed=all_perturbed)
    assert torch.equal(out, ref)
    assert layer.processor.last_fallback == ALL_PERTURBED
