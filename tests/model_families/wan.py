"""Tiny random Wan-family models: T2V, I2V, VACE, Animate, ChronoEdit, SkyReels-V2."""

import torch

from sagesla.patching.wan import CROSS_ATTENTION
from sagesla.testing import ModelFamily
from sagesla.wan_shapes import TINY_WAN_CONFIG, wan_inputs


def wan_step_inputs() -> dict:
    latent, timestep, text = wan_inputs()  # 4 x 16 x 16 latent: 256 tokens, 4 key blocks of 64
    return {"hidden_states": latent, "timestep": timestep, "encoder_hidden_states": text}


def _i2v_inputs() -> dict:
    # The I2V processor takes the last 512 context tokens as text, the ones before as image.
    return wan_step_inputs() | {
        "encoder_hidden_states": torch.randn(1, 512, 32),
        "encoder_hidden_states_image": torch.randn(1, 4, 16),
    }


def _vace_inputs() -> dict:
    return wan_step_inputs() | {"control_hidden_states": torch.randn(1, 48, 4, 16, 16)}


def _animate_inputs() -> dict:
    # 5 latent frames of 16 x 16 (320 tokens); 13 face frames give the face adapter 5 motion frames, one per latent one.
    return {
        "hidden_states": torch.randn(1, 12, 5, 16, 16),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 8, 32),
        "encoder_hidden_states_image": torch.randn(1, 4, 16),
        "pose_hidden_states": torch.randn(1, 4, 4, 16, 16),
        "face_pixel_values": torch.randn(1, 3, 13, 16, 16),
    }


def blocks(prefix: str, layer: str, count: int = 2) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}.{layer}" for i in range(count))


def _cross(*layers: str) -> dict[str, str]:
    return dict.fromkeys(layers, CROSS_ATTENTION)


_ANIMATE = {
    **TINY_WAN_CONFIG,
    "in_channels": 12,
    "latent_channels": 4,
    "out_channels": 4,
    "image_dim": 16,
    "motion_encoder_channel_sizes": {"4": 16, "8": 16, "16": 16},
    "motion_encoder_size": 16,
    "motion_style_dim": 8,
    "motion_dim": 4,
    "motion_encoder_dim": 16,
    "face_encoder_hidden_dim": 16,
    "face_encoder_num_heads": 2,
    "inject_face_latents_blocks": 2,
}
FAMILIES = {
    "wan-t2v": ModelFamily(
        "WanTransformer3DModel",
        TINY_WAN_CONFIG,
        wan_step_inputs,
        blocks("blocks", "attn1"),
        _cross(*blocks("blocks", "attn2")),
    ),
    "wan-i2v": ModelFamily(
        "WanTransformer3DModel",
        {**TINY_WAN_CONFIG, "image_dim": 16, "added_kv_proj_dim": 128},
        _i2v_inputs,
        blocks("blocks", "attn1"),
        _cross(*blocks("blocks", "attn2")),
    ),
    "vace": ModelFamily(
        "WanVACETransformer3DModel",
        {**TINY_WAN_CONFIG, "vace_layers": [0, 1], "vace_in_channels": 48},
        _vace_inputs,
        blocks("blocks", "attn1") + blocks("vace_blocks", "attn1"),
        _cross(*blocks("blocks", "attn2"), *blocks("vace_blocks", "attn2")),
    ),
    "animate": ModelFamily(
        "WanAnimateTransformer3DModel",
        _ANIMATE,
        _animate_inputs,
        blocks("blocks", "attn1"),
        _cross(*blocks("blocks", "attn2"), "face_adapter.0"),
    ),
    "chronoedit": ModelFamily(
        "ChronoEditTransformer3DModel",
        TINY_WAN_CONFIG,
        wan_step_inputs,
        blocks("blocks", "attn1"),
        _cross(*blocks("blocks", "attn2")),
    ),
    "skyreels-v2": ModelFamily(
        "SkyReelsV2Transformer3DModel",
        TINY_WAN_CONFIG,
        wan_step_inputs,
        blocks("blocks", "attn1"),
        _cross(*blocks("blocks", "attn2")),
    ),
}
