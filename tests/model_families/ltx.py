"""Tiny random LTX-Video and LTX-2 models: 4 x 8 x 8 latent frames with patch size 1 (256 video tokens, 4 key blocks
of 64), 13 prompt tokens of which the last 4 are padding; LTX-2 with 12 audio tokens, and LTX-2.3's attention
(``LTX2PerturbedAttnProcessor``, per-head gates)."""

import torch

from sagesla.patching.ltx import AUDIO_SELF_ATTENTION, AUDIO_VIDEO_CROSS_ATTENTION, TEXT_CROSS_ATTENTION
from sagesla.testing import ModelFamily

FRAMES, HEIGHT, WIDTH = 4, 8, 8
TEXT, PADDED = 13, 4
AUDIO_FRAMES = 12

LTX_CONFIG = {
    "in_channels": 8,
    "out_channels": 8,
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "cross_attention_dim": 128,
    "num_layers": 2,
    "caption_channels": 16,
}
# LTX-2.0's layout (split RoPE, no gates) at a tiny width; the audio stream of 2 heads of 16.
LTX2_CONFIG = {
    **LTX_CONFIG,
    "audio_in_channels": 8,
    "audio_out_channels": 8,
    "audio_num_attention_heads": 2,
    "audio_attention_head_dim": 16,
    "audio_cross_attention_dim": 32,
    "rope_type": "split",
}
# LTX-2.3's attention: every layer under LTX2PerturbedAttnProcessor (spatio-temporal guidance), with per-head gates.
LTX2_PERTURBED_CONFIG = {**LTX2_CONFIG, "perturbed_attn": True, "gated_attn": True, "audio_gated_attn": True}


def _text_mask() -> torch.Tensor:
    mask = torch.ones(1, TEXT)
    mask[:, TEXT - PADDED :] = 0
    return mask


def ltx_inputs() -> dict:
    return {
        "hidden_states": torch.randn(1, FRAMES * HEIGHT * WIDTH, 8),
        "encoder_hidden_states": torch.randn(1, TEXT, 16),
        "timestep": torch.tensor([500]),
        "encoder_attention_mask": _text_mask(),
        "num_frames": FRAMES,
        "height": HEIGHT,
        "width": WIDTH,
    }


def ltx2_inputs() -> dict:
    return ltx_inputs() | {
        "timestep": torch.tensor([500.0]),
        "audio_hidden_states": torch.randn(1, AUDIO_FRAMES, 8),
        "audio_encoder_hidden_states": torch.randn(1, TEXT, 16),
        "audio_encoder_attention_mask": _text_mask(),
        "audio_num_frames": AUDIO_FRAMES,
    }


def blocks(layer: str, count: int = 2) -> tuple[str, ...]:
    return tuple(f"transformer_blocks.{i}.{layer}" for i in range(count))


def ltx2_skipped() -> dict[str, str]:
    """{layer: reason} of the LTX-2 layers that stay dense."""
    reasons = {
        "audio_attn1": AUDIO_SELF_ATTENTION,
        "attn2": TEXT_CROSS_ATTENTION,
        "audio_attn2": TEXT_CROSS_ATTENTION,
        "audio_to_video_attn": AUDIO_VIDEO_CROSS_ATTENTION,
        "video_to_audio_attn": AUDIO_VIDEO_CROSS_ATTENTION,
    }
    return {f"transformer_blocks.{i}.{layer}": reason for i in range(2) for layer, reason in reasons.items()}


FAMILIES = {
    "ltx-video": ModelFamily(
        "LTXVideoTransformer3DModel",
        LTX_CONFIG,
        ltx_inputs,
        blocks("attn1"),
        dict.fromkeys(blocks("attn2"), TEXT_CROSS_ATTENTION),
    ),
    "ltx-2": ModelFamily("LTX2VideoTransformer3DModel", LTX2_CONFIG, ltx2_inputs, blocks("attn1"), ltx2_skipped()),
    "ltx-2-perturbed": ModelFamily(
        "LTX2VideoTransformer3DModel", LTX2_PERTURBED_CONFIG, ltx2_inputs, blocks("attn1"), ltx2_skipped()
    ),
}
