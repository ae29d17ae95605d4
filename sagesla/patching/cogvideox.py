"""SLA inside the joint text+video attention of diffusers' CogVideoX, ConsisID and CogView3Plus transformers.

Served: ``transformer_blocks.{i}.attn1`` under ``CogVideoXAttnProcessor2_0`` (``diffusers_api.PROCESSORS``), the
one attention of each block: a softmax over the [text; video] tokens (text first; CogView3Plus's image tokens take
the video's place). SLA serves the video queries over the video keys, joined by the text keys (see
``SLAProcessor``); the text queries attend densely. Not served, as they are:

- a layer under ``FusedCogVideoXAttnProcessor2_0`` (``fuse_qkv_projections``: one ``to_qkv``): ``PROCESSORS`` lists
  it as skipped, so ``patch`` reports it; ``unfuse_qkv_projections`` brings back the processor SLA reproduces.
- ConsisID's face modules (``local_facial_extractor``, ``perceiver_cross_attention``) are no diffusers attention
  layers and stay out of the survey.

The models pass no attention mask (a caller of CogVideoX may, through ``attention_kwargs``): a boolean mask over
the keys that masks text keys only is SLA's text mask; a call with any other mask runs the replaced processor.

Shapes: B batch, S video tokens, T text tokens, H heads, D head dim; the processor attends in (B, H, T + S, D),
SLA takes (B, S, H, D) ("NHD").
This module imports diffusers; ``sagesla.patch`` imports it only when called.
"""

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from sagesla.patching.processor import Projected, SLAProcessor, prepared_mask

UNSERVED_MASK = "an attention mask other than a boolean text key-padding mask (SLA masks text keys only)"


def _text_key_mask(mask: torch.Tensor, text_length: int) -> torch.Tensor | None:
    """The text keys attended, (B, T) bool, of a (B, H, Q, T + S) mask that masks text keys only: boolean, the same
    for every query and head, every video key attended. None for any other mask."""
    if mask.dtype != torch.bool or mask.shape[-2] != 1:
        return None
    keys = mask[:, :, 0]
    if not bool((keys == keys[:, :1]).all()) or not bool(keys[:, 0, text_length:].all()):
        return None
    return keys[:, 0, :text_length]


class SLACogVideoXAttnProcessor(SLAProcessor):
    """Processor for a CogVideoX-family joint attention layer: diffusers' projections, QK-norm and RoPE around
    ``attn.sla``.

    Each call runs the replaced ``CogVideoXAttnProcessor2_0``'s steps on the [text; video] tokens (``to_q/to_k/to_v``,
    per-head ``norm_q`` / ``norm_k``, RoPE on the video queries, and keys unless ``is_cross_attention``), SLA for the
    video queries and dense attention for the text queries, then ``to_out`` over [text; video] and the split into
    (video, text). When SLA cannot serve the call it runs the very attention the replaced processor runs. See
    ``SLAProcessor`` for the attributes.
    """

    family = "cogvideox"

    @staticmethod
    def layer_reason(name: str, module: torch.nn.Module) -> str | None:
        """None: every attention layer of these models is the joint text+video attention of a block."""
        return None

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: (B, S, dim) video; encoder_hidden_states: (B, T, dim) text; image_rotary_emb: (cos, sin),
        each (S, D). Returns (video (B, S, dim), text (B, T, dim))."""
        if self.runs_original():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        text_length = encoder_hidden_states.shape[1]
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, length, _ = tokens.shape
        mask = text_mask = None
        if attention_mask is not None:
            mask = prepared_mask(attn, attention_mask, batch_size, length)
            text_mask = _text_key_mask(mask, text_length)
            if text_mask is None:
                self.fall_back(UNSERVED_MASK)
                return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        # (B, H, T + S, D), as the processor attends.
        query, key, value = (
            projection(tokens).view(batch_size, length, attn.heads, -1).transpose(1, 2)
            for projection in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text = [x[:, :, :text_length] for x in (query, key, value)]
        query, key, value = (x[:, :, text_length:] for x in (query, key, value))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            if not attn.is_cross_attention:
                key = apply_rotary_emb(key, image_rotary_emb)
        projected = Projected(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            mask,
            tuple(x.transpose(1, 2) for x in text),
            text_mask,
        )
        video_out, text_out = self.attention(attn, projected)
        out = torch.cat([text_out, video_out], dim=1).reshape(batch_size, length, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        text_out, video_out = out.split([text_length, length - text_length], dim=1)
        return video_out, text_out

    def dense(self, projected: Projected, parallel_config: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention the replaced processor runs (``F.scaled_dot_product_attention`` over [text; video] in
        (B, H, T + S, D), the layer's mask): (video (B, S, H, D), text (B, T, H, D))."""
        query, key, value = (
            torch.cat([text.transpose(1, 2), video.transpose(1, 2)], dim=2)
            for text, video in zip(projected.text, (projected.query, projected.key, projected.value), strict=True)
        )
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=projected.attention_mask, dropout_p=0.0, is_causal=False
        ).transpose(1, 2)
        text_length = projected.text[0].shape[1]
        return out[:, text_length:], out[:, :text_length]
