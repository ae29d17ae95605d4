"""The embedded video model: a small diffusers ``WanTransformer3DModel`` plus a learned word embedding as its text
encoder, for the procedural videos of ``sagesla.embedded.videos`` (32 frames of 64 x 64 pixels: 2048 tokens, 32 key
blocks of 64, one a frame).

Its weights file (``scripts/train_tiny.py`` writes it): safetensors with the transformer under ``transformer.``
(bf16), the prompt embedding under ``prompts.`` and the config as JSON under the metadata key ``config``.
"""

import json
import os
import pathlib

import torch
from torch import nn

from sagesla.embedded.videos import VOCABULARY, tokenize

# 6 blocks of 4 heads x 64: about 5.8 M parameters (11.5 MB in bf16); latents [12, 32, 32, 32] in 4 x 4 patches ->
# 32 frames x 8 x 8 = 2048 tokens, so a 64-token key block is one whole frame and a query block's top key blocks are
# the frames it draws on: block sparsity in time, as in long videos, with space inside the blocks.
TINY_VIDEO_CONFIG = {
    "patch_size": (1, 4, 4),
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": 12,
    "out_channels": 12,
    "text_dim": 64,
    "freq_dim": 64,
    "ffn_dim": 640,
    "num_layers": 6,
    "qk_norm": "rms_norm_across_heads",
    "cross_attn_norm": True,
    "rope_max_seq_len": 64,
}
LATENT_SHAPE = (12, 32, 32, 32)  # channels, frames, height, width
WEIGHTS = pathlib.Path(__file__).with_name("tiny-video.safetensors")


class PromptEmbedding(nn.Module):
    """Prompts -> text embeddings [N, 4, text_dim] (one learned vector per entry of ``VOCABULARY``)."""

    def __init__(self, text_dim: int = TINY_VIDEO_CONFIG["text_dim"]):
        super().__init__()
        self.words = nn.Embedding(len(VOCABULARY), text_dim)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.words(tokenize(prompts).to(self.words.weight.device))


def build(config: dict = TINY_VIDEO_CONFIG) -> tuple[nn.Module, PromptEmbedding]:
    """(transformer, prompt embedding) with fresh random weights (needs diffusers)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**config), PromptEmbedding(config["text_dim"])


def config_of(model: nn.Module) -> dict:
    """The ``TINY_VIDEO_CONFIG`` entries ``model`` was built with (what a weights file records as ``config``)."""
    return {key: model.config[key] for key in TINY_VIDEO_CONFIG}


def load(path: str | os.PathLike, device: str | torch.device) -> tuple[nn.Module, PromptEmbedding]:
    """(transformer, prompt embedding) in eval mode on ``device``, built from the config a weights file records.

    Other keys of the file (e.g. a fine-tune's ``blocks.{i}.attn1.sla.proj_l.*``) are left to their own loaders.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file records no config.
    """
    from safetensors import safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`weights` must be a file written by scripts/train_tiny.py, got {str(path)!r}")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        if "config" not in metadata:
            raise ValueError(f"`weights` {str(path)!r} records no model config: it was not written by train_tiny.py")
        config = json.loads(metadata["config"])
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    config["patch_size"] = tuple(config["patch_size"])
    model, prompts = build(config)
    for prefix, module in (("transformer.", model), ("prompts.", prompts)):
        module.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    return model.to(device).eval(), prompts.to(device).eval()


def weights_tensors(model: nn.Module, prompts: PromptEmbedding) -> dict[str, torch.Tensor]:
    """What ``load`` reads back: the transformer's state (bf16; any SLA ``proj_l`` left out) and the embedding's.

    A patched model's ``blocks.{i}.attn1.sla.proj_l.*`` belong to SLA weights files, not to this one.
    """
    from sagesla.patching.checkpoints import sla_parameters

    sla = sla_parameters(model)
    tensors = {
        f"transformer.{key}": value.detach().to("cpu", torch.bfloat16).contiguous()
        for key, value in model.state_dict().items()
        if key not in sla
    }
    return tensors | {
        f"prompts.{key}": value.detach().cpu().contiguous() for key, value in prompts.state_dict().items()
    }
