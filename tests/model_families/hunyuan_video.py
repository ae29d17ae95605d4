"""Tiny random HunyuanVideo-family models (joint [video; text] attention): HunyuanVideo (dual- and single-stream
blocks), HunyuanVideo-Framepack (history latents and image tokens) and HunyuanVideo 1.5 (a mask over queries and
keys); each with text tokens padded, as the pipelines pass them."""

from types import SimpleNamespace

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from sagesla.patching.families import unserved_reason
from sagesla.testing import ModelFamily

# 27 text tokens (not a multiple of 64), 23 and 15 of them attended.
TEXT_TOKENS = 27
ATTENDED = (23, 15)
# Two heads of 64; the RoPE axes (frames, height, width) split the head dim.
_HUNYUAN_VIDEO = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "num_layers": 2,
    "num_single_layers": 2,
    "num_refiner_layers": 1,
    "text_embed_dim": 32,
    "pooled_projection_dim": 16,
    "rope_axes_dim": (16, 24, 24),
}
_FRAMEPACK = {**_HUNYUAN_VIDEO, "has_image_proj": True, "image_proj_dim": 16, "has_clean_x_embedder": True}
_HUNYUAN_VIDEO_15 = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "num_layers": 2,
    "num_refiner_layers": 1,
    "text_embed_dim": 32,
    "text_embed_2_dim": 24,
    "image_embed_dim": 16,
    "rope_axes_dim": (16, 24, 24),
}


def text_mask(attended: tuple[int, ...] = ATTENDED, tokens: int = TEXT_TOKENS) -> torch.Tensor:
    """(B, tokens) int64, as a tokenizer gives it: each row's first ``attended[b]`` tokens 1."""
    return (torch.arange(tokens) < torch.tensor(attended)[:, None]).long()


def hunyuan_video_inputs() -> dict:
    # 4 latent frames of 16 x 16 in patches of 2: 256 video tokens, 4 key blocks.
    return {
        "hidden_states": torch.randn(2, 4, 4, 16, 16),
        "timestep": torch.tensor([500, 500]),
        "encoder_hidden_states": torch.randn(2, TEXT_TOKENS, 32),
        "encoder_attention_mask": text_mask(),
        "pooled_projections": torch.randn(2, 16),
        "guidance": torch.tensor([6000.0, 6000.0]),
    }


def framepack_inputs() -> dict:
    # Video tokens in patches of 2 of 16 x 16 latents: 4 of the 4x history (4 frames, 8 x 8 x 4 patches), 16 of the
    # 2x one (2 frames, 4 x 4 x 2), 128 of the clean one (2 frames) and 128 of the latents (2 frames): 276. Four
    # image tokens lead the text.
    return hunyuan_video_inputs() | {
        "hidden_states": torch.randn(2, 4, 2, 16, 16),
        "image_embeds": torch.randn(2, 4, 16),
        "indices_latents": torch.arange(7, 9),
        "latents_clean": torch.randn(2, 4, 2, 16, 16),
        "indices_latents_clean": torch.tensor([0, 6]),
        "latents_history_2x": torch.randn(2, 4, 2, 16, 16),
        "indices_latents_history_2x": torch.arange(4, 6),
        "latents_history_4x": torch.randn(2, 4, 4, 16, 16),
        "indices_latents_history_4x": torch.arange(0, 4),
    }


def hunyuan_video_15_inputs() -> dict:
    # 4 latent frames of 8 x 8 in patches of 1: 256 video tokens. Text-to-video: the 4 image tokens are zero and
    # masked out; 20 MLLM tokens (17 and 9 attended) and 9 ByT5 tokens (5 and 2): 33 text tokens in all.
    return {
        "hidden_states": torch.randn(2, 4, 4, 8, 8),
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": torch.randn(2, 20, 32),
        "encoder_attention_mask": text_mask((17, 9), 20),
        "encoder_hidden_states_2": torch.randn(2, 9, 24),
        "encoder_attention_mask_2": text_mask((5, 2), 9),
        "image_embeds": torch.zeros(2, 4, 16),
    }


def _joint_layers(dual: int, single: int = 0) -> tuple[str, ...]:
    return tuple(f"transformer_blocks.{i}.attn" for i in range(dual)) + tuple(
        f"single_transformer_blocks.{i}.attn" for i in range(single)
    )


_REFINER = "context_embedder.token_refiner.refiner_blocks.0.attn"
# The token refiner's attention runs diffusers' generic processor, which the report names.
_REFINER_SKIPPED = {_REFINER: unserved_reason(SimpleNamespace(processor=AttnProcessor2_0()))}


FAMILIES = {
    "hunyuan-video": ModelFamily(
        "HunyuanVideoTransformer3DModel",
        _HUNYUAN_VIDEO,
        hunyuan_video_inputs,
        _joint_layers(2, 2),
        _REFINER_SKIPPED,
    ),
    "hunyuan-video-framepack": ModelFamily(
        "HunyuanVideoFramepackTransformer3DModel",
        _FRAMEPACK,
        framepack_inputs,
        _joint_layers(2, 2),
        _REFINER_SKIPPED,
    ),
    "hunyuan-video-1.5": ModelFamily(
        "HunyuanVideo15Transformer3DModel",
        _HUNYUAN_VIDEO_15,
        hunyuan_video_15_inputs,
        _joint_layers(2),
        _REFINER_SKIPPED,
    ),
}
