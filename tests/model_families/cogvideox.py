"""Tiny random CogVideoX-family models (joint [text; video] attention under ``CogVideoXAttnProcessor2_0``): CogVideoX
with RoPE, ConsisID with its face modules, and the image model CogView3Plus."""

import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed

from sagesla.testing import ModelFamily

# 27 text tokens (not a multiple of 64); 4 latent frames of 16 x 16 in patches of 2: 256 video tokens, 4 key blocks.
TEXT_TOKENS = 27
FRAMES, SIZE, PATCH = 4, 16, 2
_COGVIDEOX = {
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 32,
    "text_embed_dim": 32,
    "num_layers": 2,
    "sample_width": SIZE,
    "sample_height": SIZE,
    "sample_frames": (FRAMES - 1) * 4 + 1,
    "patch_size": PATCH,
    "max_text_seq_length": TEXT_TOKENS,
    "use_rotary_positional_embeddings": True,
}
# The face modules: inner dim 128, so the face tokens are int(128 / 3 * 2) = 85 wide.
_CONSISID = {
    **_COGVIDEOX,
    "is_train_face": True,
    "cross_attn_interval": 1,
    "cross_attn_dim_head": 16,
    "cross_attn_num_heads": 2,
    "LFE_id_dim": 16,
    "LFE_vit_dim": 32,
    "LFE_depth": 2,
    "LFE_dim_head": 16,
    "LFE_num_heads": 2,
    "LFE_num_id_token": 2,
    "LFE_num_querie": 4,
    "LFE_output_dim": 85,
    "LFE_ff_mult": 1,
    "LFE_num_scale": 2,
}
# 32 x 32 latent in patches of 2: 256 image tokens.
_COGVIEW3PLUS = {
    "patch_size": PATCH,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 64,
    "num_attention_heads": 2,
    "text_embed_dim": 32,
    "time_embed_dim": 32,
    "condition_dim": 16,
    "pos_embed_max_size": 32,
    "sample_size": 32,
}


def _cogvideox_inputs() -> dict:
    grid = SIZE // PATCH
    rotary = get_3d_rotary_pos_embed(64, ((0, 0), (grid, grid)), (grid, grid), FRAMES)
    return {
        "hidden_states": torch.randn(1, FRAMES, 4, SIZE, SIZE),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, 32),
        "timestep": torch.tensor([500]),
        "image_rotary_emb": rotary,
    }


def _consisid_inputs() -> dict:
    return _cogvideox_inputs() | {"id_cond": torch.randn(1, 16), "id_vit_hidden": [torch.randn(1, 5, 32)] * 2}


def _cogview3plus_inputs() -> dict:
    return {
        "hidden_states": torch.randn(1, 4, 32, 32),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, 32),
        "timestep": torch.tensor([500]),
        "original_size": torch.tensor([[256.0, 256.0]]),
        "target_size": torch.tensor([[256.0, 256.0]]),
        "crop_coords": torch.tensor([[0.0, 0.0]]),
    }


_ATTENTION = ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1")
FAMILIES = {
    "cogvideox": ModelFamily("CogVideoXTransformer3DModel", _COGVIDEOX, _cogvideox_inputs, _ATTENTION, {}),
    "consisid": ModelFamily("ConsisIDTransformer3DModel", _CONSISID, _consisid_inputs, _ATTENTION, {}),
    "cogview3plus": ModelFamily("CogView3PlusTransformer2DModel", _COGVIEW3PLUS, _cogview3plus_inputs, _ATTENTION, {}),
}
