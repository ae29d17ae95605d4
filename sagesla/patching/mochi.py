"""SLA inside the joint text+video attention of diffusers' Mochi transformer.

Served: ``transformer_blocks.{i}.attn1`` under ``MochiAttnProcessor2_0`` (``diffusers_api.PROCESSORS``), the one
attention of each block: per batch row, a softmax over the [video; attended text] tokens, the text tokens masked out
by ``attention_mask`` dropped. SLA serves the video queries over the video keys, joined by the attended text keys
(its text mask; see ``SLAProcessor``); the text queries attend densely. Every attention layer of the model is one
of these; the last block's (``context_pre_only``) has no text output projection (``to_add_out``).

Shapes: B batch, S video tokens, T text tokens, H heads, D head dim; diffusers hands attention (B, S, H, D) tensors
("NHD") and the text mask as (B, T), nonzero for the attended tokens.
This module imports diffusers; ``sagesla.patch`` imports it only when called.
"""

import torch
import torch.nn.functional as F

from sagesla.patching.processor import TEXT_NORMS, TEXT_PROJECTIONS, Projected, SLAProcessor, head_projections


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Mochi's RoPE on (B, S, H, D) with (S, H, D / 2) frequencies, mirrored from ``MochiAttnProcessor2_0`` (a
    closure there, so not importable): pairs rotated in float32, the result in x's dtype.

    The test suite checks that the dense path of this processor reproduces diffusers' output bit for bit.
    """
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    cos = (even * freqs_cos - odd * freqs_sin).to(x.dtype)
    sin = (even * freqs_sin + odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


def _diffusers_text_layout(text_out: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """The text output (B, T, H, D) laid out as diffusers' per-row loop leaves it: the attended tokens' outputs first,
    in order, then zeros (the dropped tokens' places, padded at the end). The same as ``text_out`` for a mask whose
    attended tokens come first."""
    text_out = text_out.masked_fill(~text_mask[:, :, None, None], 0)
    order = torch.sort((~text_mask).int(), dim=1, stable=True).indices
    return text_out.gather(1, order[:, :, None, None].expand_as(text_out))


class SLAMochiAttnProcessor(SLAProcessor):
    """Processor for a Mochi joint attention layer: diffusers' projections, QK-norm and RoPE around ``attn.sla``.

    Each call runs the replaced ``MochiAttnProcessor2_0``'s steps (``to_q/to_k/to_v`` of the video and
    ``add_q_proj/add_k_proj/add_v_proj`` of the text, per-head ``norm_q`` / ``norm_k`` / ``norm_added_q`` /
    ``norm_added_k``, Mochi's RoPE on the video queries and keys), SLA for the video queries and dense attention for
    the text queries over the attended text tokens, then ``to_out`` of the video and ``to_add_out`` of the text
    (where the layer has one), the dropped text tokens' outputs zero as in diffusers. When SLA cannot serve the call
    it runs the very attention the replaced processor runs. See ``SLAProcessor`` for the attributes.
    """

    family = "mochi"

    @staticmethod
    def layer_reason(name: str, module: torch.nn.Module) -> str | None:
        """None: every attention layer of the model is the joint text+video attention of a block."""
        return None

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: (B, S, dim) video; encoder_hidden_states: (B, T, dim_text) text; attention_mask: (B, T),
        nonzero for the attended text tokens; image_rotary_emb: (cos, sin), each (S, H, D / 2). Returns
        (video (B, S, dim), text (B, T, dim_text))."""
        if self.runs_original():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = head_projections(attn, hidden_states)
        text = head_projections(attn, encoder_hidden_states, TEXT_PROJECTIONS, TEXT_NORMS)
        if image_rotary_emb is not None:
            query = _apply_rotary_emb(query, *image_rotary_emb)
            key = _apply_rotary_emb(key, *image_rotary_emb)
        text_mask = attention_mask.bool()
        projected = Projected(query, key, value, attention_mask, text, text_mask)
        video_out, text_out = self.attention(attn, projected)
        text_out = _diffusers_text_layout(text_out, text_mask)
        # (B, S + T, H*D) as diffusers lays out its rows' outputs, split into the video and text streams.
        out = torch.cat([video_out, text_out], dim=1).flatten(2, 3)
        video_out, text_out = out.split_with_sizes((video_out.shape[1], text_out.shape[1]), dim=1)
        video_out = attn.to_out[1](attn.to_out[0](video_out))
        if hasattr(attn, "to_add_out"):
            text_out = attn.to_add_out(text_out)
        return video_out, text_out

    def dense(self, projected: Projected, parallel_config: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention the replaced processor runs: per batch row, ``F.scaled_dot_product_attention`` over the
        [video; attended text] tokens in (1, H, S + T', D). Returns (video (B, S, H, D), text (B, T, H, D): each text
        token's output in its place, zero for the dropped ones)."""
        query, key, value = (x.transpose(1, 2) for x in (projected.query, projected.key, projected.value))
        text_query, text_key, text_value = (x.transpose(1, 2) for x in projected.text)
        length = query.shape[2]
        video_out, text_out = [], []
        for row, mask in enumerate(projected.attention_mask):
            attended = torch.nonzero(mask, as_tuple=False).flatten()
            one = slice(row, row + 1)
            out = F.scaled_dot_product_attention(
                torch.cat([query[one], text_query[one, :, attended]], dim=2),
                torch.cat([key[one], text_key[one, :, attended]], dim=2),
                torch.cat([value[one], text_value[one, :, attended]], dim=2),
                dropout_p=0.0,
                is_causal=False,
            )
            video_out.append(out[:, :, :length])
            text_out.append(torch.zeros_like(text_query[one]).index_copy_(2, attended, out[:, :, length:]))
        return torch.cat(video_out).transpose(1, 2), torch.cat(text_out).transpose(1, 2)
