"""Wan transformer shapes and random-weight builders: the tiny test model, Wan2.1 1.3B / 14B, step inputs.

Building a model imports diffusers (optional); importing this module does not.
"""

import dataclasses

import torch

# A 2-block diffusers WanTransformer3DModel, 2 heads of 64: a forward on ``wan_inputs()`` (256 tokens) takes 0.02 s
# on 2 CPU cores.
TINY_WAN_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 128,
    "num_layers": 2,
    "qk_norm": "rms_norm_across_heads",
    "cross_attn_norm": True,
    "rope_max_seq_len": 32,
}


@dataclasses.dataclass(frozen=True)
class WanShape:
    """A Wan transformer config with the latent it serves: (frames, height, width) and text tokens."""

    config: dict
    latent: tuple[int, int, int]
    text_tokens: int

    @property
    def tokens(self) -> int:
        """Self-attention sequence length: the latent over the (1, 2, 2) patch."""
        frames, height, width = self.latent
        return frames * (height // 2) * (width // 2)


# diffusers' Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers transformer configs (other arguments keep their defaults);
# latents of 81 frames at 480 x 832 (32760 tokens) and 720 x 1280 (75600 tokens) after the VAE's 4 x 8 x 8.
_WAN21 = {"freq_dim": 256, "text_dim": 4096, "eps": 1e-6, "attention_head_dim": 128}
WAN_SHAPES = {
    "tiny": WanShape(TINY_WAN_CONFIG, (4, 16, 16), 8),
    "wan2.1-1.3b": WanShape(
        {**_WAN21, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}, (21, 60, 104), 512
    ),
    "wan2.1-14b": WanShape(
        {**_WAN21, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}, (21, 90, 160), 512
    ),
}


def build_wan(shape: WanShape, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A ``WanTransformer3DModel`` of ``shape.config`` with random weights, built on ``device`` in ``dtype``."""
    from diffusers import WanTransformer3DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a 14B model never exists in fp32
    try:
        with torch.device(device):
            return WanTransformer3DModel(**shape.config).eval()
    finally:
        torch.set_default_dtype(previous)


def wan_step_inputs(
    shape: WanShape, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (latent [1, 16, F, H, W], timestep [1], text [1, T, text_dim]) for one forward of ``shape``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    latent = torch.randn(1, 16, *shape.latent, generator=gen, device=device).to(dtype)
    text = torch.randn(1, shape.text_tokens, shape.config["text_dim"], generator=gen, device=device).to(dtype)
    return latent, torch.tensor([500], device=device), text


def tiny_wan_transformer() -> torch.nn.Module:
    """A ``WanTransformer3DModel`` built from ``TINY_WAN_CONFIG`` (random weights, eval mode; needs diffusers)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**TINY_WAN_CONFIG).eval()


def wan_inputs(frames: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (latent [1, 16, frames, size, size], timestep [1], text [1, 8, 32]); frames * size^2 / 4 tokens."""
    return torch.randn(1, 16, frames, size, size), torch.tensor([500]), torch.randn(1, 8, 32)


def run_wan(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The model's output [1, 16, frames, size, size] for ``wan_inputs``, without autograd."""
    with torch.no_grad():
        return model(*inputs, return_dict=False)[0]
