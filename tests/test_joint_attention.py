"""Joint text+video attention: SLA's processors for the models that attend over video and text tokens together."""

import copy
import pathlib

import pytest
import torch
import torch.nn.functional as F

import sagesla
from sagesla.kernels.block_select_ref import lut_to_mask
from sagesla.testing import (
    BOUND_SLA,
    assert_close,
    dense_masked_attention,
    expand_block_mask,
    load_module,
    run_forward,
    run_model,
    sla_processors,
)

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import FusedCogVideoXAttnProcessor2_0  # noqa: E402
from diffusers.models.transformers import transformer_hunyuan_video  # noqa: E402

from sagesla.patching import hunyuan_video  # noqa: E402
from sagesla.patching.cogvideox import UNSERVED_MASK  # noqa: E402

# -- CogVideoX and Mochi

_FAMILIES = pathlib.Path(__file__).parent / "model_families"
MOCHI = load_module(_FAMILIES / "mochi.py")
COGVIDEOX = load_module(_FAMILIES / "cogvideox.py")
# The text queries' dense float32 attention (SLA leaves it to ``joint_text_attention``) against diffusers': measured
# 0 to 2e-7 at the layer output.
JOINT_TEXT_TOL = 1e-5
# SLA (quantized=False, bf16) at topk=1.0 against the unpatched CogVideoX with a text key-padding mask: as
# tests/test_model_families.py's MODEL_TOL (measured 2e-5 to 4e-5).
COGVIDEOX_MASK_TOL = 1e-4


def _first_mochi_layer_call() -> tuple[torch.nn.Module, dict]:
    """(tiny Mochi, the keywords its forward hands ``transformer_blocks.0.attn1``: hidden_states (B, S, dim),
    encoder_hidden_states (B, T, dim), attention_mask (B, T) bool, image_rotary_emb)."""
    family = MOCHI.FAMILIES["mochi"]
    model, calls = family.build(), []
    layer = model.transformer_blocks[0].attn1
    handle = layer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    run_model(model, family.inputs())
    handle.remove()
    return model, calls[0]


def _as_float64(kwargs: dict) -> dict:
    """The layer call's keywords with every floating tensor (RoPE's too) in float64."""

    def convert(x):
        if isinstance(x, tuple):
            return tuple(convert(item) for item in x)
        return x.double() if x.is_floating_point() else x

    return {name: convert(x) for name, x in kwargs.items()}


def _diffusers_rows(layer: torch.nn.Module, kwargs: dict, monkeypatch) -> list[tuple[torch.Tensor, ...]]:
    """The (q, k, v) diffusers' Mochi processor attends over in each batch row, (1, H, S + T_b, D): the row's video
    tokens and its attended text tokens, computed by diffusers itself in float64."""
    rows, attend = [], F.scaled_dot_product_attention

    def recording(q, k, v, *args, **options):
        rows.append((q, k, v))
        return attend(q, k, v, *args, **options)

    reference = copy.deepcopy(layer).double()
    with monkeypatch.context() as patched:
        patched.setattr(F, "scaled_dot_product_attention", recording)
        reference.processor(reference, **_as_float64(kwargs))
    return rows


def _record_sla_inputs(layer: torch.nn.Module) -> list[tuple]:
    """Records the (q, k, v) of every call of ``layer.sla``, each (B, S, H, D)."""
    calls = []
    layer.sla.register_forward_pre_hook(lambda module, args: calls.append(args[:3]))
    return calls


def test_mochi_layer_matches_the_joint_semantics_in_float64(monkeypatch):
    model, kwargs = _first_mochi_layer_call()
    layer, topk = model.transformer_blocks[0].attn1, 0.5
    rows = _diffusers_rows(layer, kwargs, monkeypatch)
    reference = copy.deepcopy(layer).double()
    sagesla.patch(model, topk=topk, quantized=False, backend="torch")
    calls = _record_sla_inputs(layer)
    with torch.no_grad():
        video, text = layer(**kwargs)
    assert layer.processor.last_fallback is None and layer.processor.last_sparsity > 0
    # The block selection SLA made: the reference pipeline's on the same bf16 inputs.
    (query, key, value), length = calls[0], calls[0][0].shape[1]
    inputs = (x.to(torch.bfloat16) for x in (query, key, value))
    _, lut = run_forward("torch", *inputs, topk=topk, tensor_layout="NHD", quantized=False, pv_precision="half")
    selected = expand_block_mask(lut_to_mask(lut, -(-length // 64)), length, 64, 64)
    video_ref, text_ref = [], []
    for row, (q, k, v) in enumerate(rows):
        # Video queries: their selected video key blocks and every attended text key; text queries: every key.
        mask = torch.ones(1, q.shape[1], q.shape[2], q.shape[2], dtype=torch.bool)
        mask[:, :, :length, :length] = selected[row]
        out = dense_masked_attention(q, k, v, mask).transpose(1, 2).flatten(2, 3)
        video_ref.append(out[:, :length])
        text_ref.append(F.pad(out[:, length:], (0, 0, 0, text.shape[1] - out.shape[1] + length)))
    with torch.no_grad():
        video_ref = reference.to_out[0](torch.cat(video_ref))
        text_ref = reference.to_add_out(torch.cat(text_ref))
    assert_close("video", video_ref, video.double(), BOUND_SLA)
    assert_close("text", text_ref, text.double(), JOINT_TEXT_TOL)


def test_mochi_padded_text_tokens_never_change_the_outputs():
    model, kwargs = _first_mochi_layer_call()
    layer = model.transformer_blocks[0].attn1
    sagesla.patch(model, topk=0.25, quantized=False, backend="torch")
    padded = ~kwargs["attention_mask"]
    assert padded.any(dim=1).all()
    noisy = kwargs["encoder_hidden_states"].clone()
    noisy[padded] = 1e4 * torch.randn(int(padded.sum()), noisy.shape[-1])
    with torch.no_grad():
        video, text = layer(**kwargs)
        assert layer.processor.last_fallback is None
        noisy_video, noisy_text = layer(**kwargs | {"encoder_hidden_states": noisy})
    assert torch.equal(noisy_video, video) and torch.equal(noisy_text, text)
    # diffusers' layout: a padded text token's attention output is zero, so its output is to_add_out's bias.
    assert torch.equal(text[padded], layer.to_add_out.bias.expand(int(padded.sum()), -1))


def test_mochi_text_output_keeps_diffusers_layout_for_a_mask_with_holes():
    # diffusers' per-row loop puts the attended tokens' outputs first and pads the rest with zeros: for a mask whose
    # attended tokens do not come first, the text outputs move. SLA's processor lays them out the same way.
    model, kwargs = _first_mochi_layer_call()
    layer = model.transformer_blocks[0].attn1
    holes = torch.rand(kwargs["attention_mask"].shape) < 0.7
    kwargs = kwargs | {"attention_mask": holes}
    with torch.no_grad():
        video_ref, text_ref = layer(**kwargs)
        sagesla.patch(model, topk=1.0, quantized=False, backend="torch")
        video, text = layer(**kwargs)
        assert layer.processor.last_fallback is None
        sagesla.unpatch(model)
        sagesla.patch(model, topk=1.0, quantized=False, backend="torch", block_q=512, block_k=512)
        dense_video, dense_text = layer(**kwargs)
    assert_close("video", video_ref, video, BOUND_SLA)
    assert_close("text", text_ref, text, JOINT_TEXT_TOL)
    assert torch.equal(dense_video, video_ref) and torch.equal(dense_text, text_ref)


def _cogvideox() -> tuple[torch.nn.Module, dict]:
    family = COGVIDEOX.FAMILIES["cogvideox"]
    return family.build(), family.inputs()


def test_cogvideox_fused_qkv_layers_are_reported_and_left_alone():
    model, inputs = _cogvideox()
    model.transformer_blocks[1].attn1.fuse_projections(fuse=True)
    model.transformer_blocks[1].attn1.set_processor(FusedCogVideoXAttnProcessor2_0())
    report = sagesla.patch(model, topk=0.5, quantized=False, backend="torch")
    assert list(report.replaced) == ["transformer_blocks.0.attn1"]
    assert "FusedCogVideoXAttnProcessor2_0" in report.skipped["transformer_blocks.1.attn1"]
    assert type(model.transformer_blocks[1].attn1.processor) is FusedCogVideoXAttnProcessor2_0
    assert not hasattr(model.transformer_blocks[1].attn1, "sla")
    # fuse_qkv_projections fuses every layer: nothing to patch, all reported, the model computes what it computed.
    model, inputs = _cogvideox()
    model.fuse_qkv_projections()
    ref = run_model(model, inputs)
    report = sagesla.patch(model, topk=0.5, quantized=False, backend="torch")
    assert report.replaced == {}
    assert sorted(report.skipped) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert torch.equal(run_model(model, inputs), ref)


def test_cogvideox_text_key_padding_mask_is_served_and_other_masks_fall_back():
    model, inputs = _cogvideox()
    text, video = inputs["encoder_hidden_states"].shape[1], 256
    padding = torch.ones(1, 1, text + video, dtype=torch.bool)
    padding[..., text - 5 : text] = False
    per_query = torch.ones(1, text + video, text + video, dtype=torch.bool).tril()
    masked = {
        name: inputs | {"attention_kwargs": {"attention_mask": mask}}
        for name, mask in (("padding", padding), ("per_query", per_query))
    }
    refs = {name: run_model(model, call) for name, call in masked.items()}
    assert not torch.equal(refs["padding"], run_model(model, inputs))
    sagesla.patch(model, topk=1.0, quantized=False, backend="torch")
    out = run_model(model, masked["padding"])
    assert all(p.last_fallback is None for p in sla_processors(model).values())
    assert_close("padding", refs["padding"], out, COGVIDEOX_MASK_TOL)
    assert torch.equal(run_model(model, masked["per_query"]), refs["per_query"])
    assert all(p.last_fallback == UNSERVED_MASK for p in sla_processors(model).values())


# -- HunyuanVideo

HUNYUAN = load_module(_FAMILIES / "hunyuan_video.py")


def _hunyuan_layer_call(family: str, name: str) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(tiny model, its layer ``name``, the keywords its forward hands the layer: hidden_states (B, S, dim) video,
    encoder_hidden_states (B, T, dim) text, attention_mask, image_rotary_emb)."""
    model, calls = HUNYUAN.FAMILIES[family].build(), []
    layer = model.get_submodule(name)
    handle = layer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    run_model(model, HUNYUAN.FAMILIES[family].inputs())
    handle.remove()
    return model, layer, calls[0]


def _hunyuan_padded(kwargs: dict) -> torch.Tensor:
    """(B, T) bool, the padded text tokens of a layer call: HunyuanVideo's (B, 1, 1, S + T) key mask, or
    HunyuanVideo 1.5's (B, T) text mask."""
    mask, text_length = kwargs["attention_mask"], kwargs["encoder_hidden_states"].shape[1]
    valid = mask[:, 0, 0] if mask.dim() == 4 else mask.bool()
    return ~valid[:, -text_length:]


def _hunyuan_attention_inputs(layer: torch.nn.Module, kwargs: dict, monkeypatch) -> tuple[torch.Tensor, ...]:
    """(q, k, v, mask, the layer in float64): what diffusers' HunyuanVideo processor attends over, (B, S + T, H, D)
    and (B, 1, 1, S + T), computed by diffusers itself in float64."""
    calls, attend = [], transformer_hunyuan_video.dispatch_attention_fn

    def recording(query, key, value, attn_mask=None, **options):
        calls.append((query, key, value, attn_mask))
        return attend(query, key, value, attn_mask=attn_mask, **options)

    reference = copy.deepcopy(layer).double()
    with monkeypatch.context() as patched:
        patched.setattr(transformer_hunyuan_video, "dispatch_attention_fn", recording)
        reference.processor(reference, **_as_float64(kwargs))
    return (*calls[0], reference)


@pytest.mark.parametrize("name", ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"])
def test_hunyuan_video_layer_matches_the_joint_semantics_in_float64(name, monkeypatch):
    model, layer, kwargs = _hunyuan_layer_call("hunyuan-video", name)
    query, key, value, mask, reference = _hunyuan_attention_inputs(layer, kwargs, monkeypatch)
    assert not mask.all()
    topk = 0.5
    sagesla.patch(model, topk=topk, quantized=False, backend="torch")
    calls = _record_sla_inputs(layer)
    with torch.no_grad():
        video, text = layer(**kwargs)
    assert layer.processor.last_fallback is None and layer.processor.last_sparsity > 0
    # The block selection SLA made: the reference pipeline's on the same bf16 inputs.
    length = calls[0][0].shape[1]
    inputs = (x.to(torch.bfloat16) for x in calls[0])
    _, lut = run_forward("torch", *inputs, topk=topk, tensor_layout="NHD", quantized=False, pv_precision="half")
    selected = expand_block_mask(lut_to_mask(lut, -(-length // 64)), length, 64, 64)
    # Video queries: their selected video key blocks and every attended text key; text queries: every attended key.
    batch, tokens, heads, _ = query.shape
    allowed = mask.expand(batch, heads, tokens, tokens).clone()
    allowed[:, :, :length, :length] &= selected
    out = dense_masked_attention(*(x.transpose(1, 2) for x in (query, key, value)), allowed)
    out = out.transpose(1, 2).flatten(2, 3)
    video_ref, text_ref = out[:, :length], out[:, length:]
    with torch.no_grad():
        if reference.to_out is not None:
            video_ref = reference.to_out[1](reference.to_out[0](video_ref))
        if getattr(reference, "to_add_out", None) is not None:
            text_ref = reference.to_add_out(text_ref)
    assert_close("video", video_ref, video.double(), BOUND_SLA)
    assert_close("text", text_ref, text.double(), JOINT_TEXT_TOL)


@pytest.mark.parametrize(
    "family, name",
    [
        ("hunyuan-video", "transformer_blocks.0.attn"),
        ("hunyuan-video", "single_transformer_blocks.0.attn"),
        ("hunyuan-video-1.5", "transformer_blocks.0.attn"),
    ],
)
def test_hunyuan_video_padded_text_tokens_never_change_the_video_output(family, name):
    model, layer, kwargs = _hunyuan_layer_call(family, name)
    padded = _hunyuan_padded(kwargs)
    assert padded.any(dim=1).all()
    noisy = kwargs["encoder_hidden_states"].clone()
    noisy[padded] = 1e4 * torch.randn(int(padded.sum()), noisy.shape[-1])
    with torch.no_grad():
        _, text_ref = layer(**kwargs)
        sagesla.patch(model, topk=0.25, quantized=False, backend="torch")
        video, text = layer(**kwargs)
        assert layer.processor.last_fallback is None
        noisy_video, noisy_text = layer(**kwargs | {"encoder_hidden_states": noisy})
    assert torch.equal(noisy_video, video)
    assert torch.equal(noisy_text[~padded], text[~padded])
    if family == "hunyuan-video-1.5":
        # Valid query AND valid key: a padded text query's row is fully masked, its attention output zero (torch's
        # SDPA), so its output is to_add_out's bias, as in diffusers.
        assert torch.equal(text[padded], layer.to_add_out.bias.expand(int(padded.sum()), -1))
        assert torch.equal(text[padded], text_ref[padded])


def test_hunyuan_video_token_refiner_under_the_joint_processor_is_reported_as_text_only():
    family = HUNYUAN.FAMILIES["hunyuan-video"]
    model = family.build()
    refiner = model.context_embedder.token_refiner.refiner_blocks[0].attn
    refiner.set_processor(transformer_hunyuan_video.HunyuanVideoAttnProcessor2_0())
    report = sagesla.patch(model, topk=0.5, quantized=False, backend="torch")
    assert list(report.replaced) == list(family.self_attention)
    assert report.skipped == dict.fromkeys(family.skipped, hunyuan_video.TEXT_ONLY)


def test_hunyuan_video_mask_over_video_keys_falls_back_bit_for_bit():
    model, layer, kwargs = _hunyuan_layer_call("hunyuan-video", "transformer_blocks.0.attn")
    mask = kwargs["attention_mask"].clone()
    mask[0, ..., 5] = False
    kwargs = kwargs | {"attention_mask": mask}
    with torch.no_grad():
        ref = layer(**kwargs)
        sagesla.patch(model, topk=0.5, quantized=False, backend="torch")
        out = layer(**kwargs)
    assert layer.processor.last_fallback == hunyuan_video.UNSERVED_MASK
    assert all(torch.equal(x, y) for x, y in zip(out, ref, strict=True))


# -- calibration


def test_recording_a_joint_model_measures_the_joint_attention_and_keeps_the_dense_output():
    from sagesla.calibration.record import Recording

    family = MOCHI.FAMILIES["mochi"]
    model, inputs = family.build(), family.inputs()
    dense = run_model(model, inputs)
    sagesla.patch(model, topk=0.25, quantized=False, backend="torch")
    with Recording(model, candidates=[0.25], progress=False) as recording:
        assert torch.equal(run_model(model, inputs), dense)
    measurements = recording.measurements()
    assert measurements.calls.tolist() == [[2], [2]]  # one call of a batch of 2 per layer
    # rel_l1_max: [NL, NB, NC] over candidates (0.25, 1.0). At 1.0 a joint layer with the text as exact keys is its
    # dense attention up to bf16 (a layer measured without the text keys would be off by far more); 0.25 skips blocks.
    at_one = measurements.rel_l1_max[:, 0, -1]
    assert (at_one < 5e-3).all(), at_one
    assert (measurements.rel_l1_max[:, 0, 0] > 2 * at_one).all()
