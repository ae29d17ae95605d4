"""The embedded video model: a small diffusers ``WanTransformer3DModel`` plus a learned word embedding as its text
encoder, for the procedural videos of ``sagesla.embedded.videos`` (16 frames of 32 x 32 pixels: 1024 tokens)."""

import torch
from torch import nn

from sagesla.embedded.videos import VOCABULARY, tokenize

# 8 blocks of 4 heads x 64: about 9 M parameters; latents [12, 16, 16, 16] -> 16 x 8 x 8 = 1024 tokens.
TINY_VIDEO_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": 12,
    "out_channels": 12,
    "text_dim": 64,
    "freq_dim": 64,
    "ffn_dim": 1024,
    "num_layers": 8,
    "qk_norm": "rms_norm_across_heads",
    "cross_attn_norm": True,
    "rope_max_seq_len": 64,
}
LATENT_SHAPE = (12, 16, 16, 16)  # channels, frames, height, width


class PromptEmbedding(nn.Module):
    """Prompts -> text embeddings [N, 4, text_dim] (one learned vector per word of ``VOCABULARY``)."""

    def __init__(self, text_dim: int = TINY_VIDEO_CONFIG["text_dim"]):
        super().__init__()
        self.words = nn.Embedding(len(VOCABULARY), text_dim)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.words(tokenize(prompts).to(self.words.weight.device))


def build(config: dict = TINY_VIDEO_CONFIG) -> tuple[nn.Module, PromptEmbedding]:
    """(transformer, prompt embedding) with fresh random weights (needs diffusers)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**config), PromptEmbedding(config["text_dim"])
