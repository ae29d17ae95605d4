"""SLA inside the joint text+video attention of diffusers' HunyuanVideo, HunyuanVideo-Framepack and HunyuanVideo 1.5
transformers.

Served, under the processors SLA reproduces (``diffusers_api.PROCESSORS``):

- ``HunyuanVideoAttnProcessor2_0`` (``HunyuanVideoTransformer3DModel``, ``HunyuanVideoFramepackTransformer3DModel``):
  ``transformer_blocks.{i}.attn``, the dual-stream blocks (video through ``to_q/to_k/to_v``, text through
  ``add_q_proj/add_k_proj/add_v_proj``), and ``single_transformer_blocks.{i}.attn``, the single-stream blocks (the
  processor gets the [video; text] tokens through the same projections, RoPE on the video part only). Each is one
  softmax over [video; text] tokens with a text key-padding mask.
- ``HunyuanVideo15AttnProcessor2_0`` (``HunyuanVideo15Transformer3DModel``): ``transformer_blocks.{i}.attn``, the
  same joint attention, its mask over queries and keys alike.

SLA serves the video queries over the video keys, joined by the attended text keys (its text mask; see
``SLAProcessor``); the text queries attend densely. What the models put in each stream: Framepack's history latents
(clean, 2x, 4x) are video tokens, its CLIP image tokens lead the text stream; HunyuanVideo 1.5's text stream is
[image; ByT5 glyph text; MLLM text] tokens, attended ones first (a text-to-video call masks the image tokens out).
All of them are "text" here: exact keys for the video queries, dense attention for their own queries.

Not served: the token refiner's attention (``context_embedder.token_refiner.refiner_blocks.{i}.attn``), which
attends over the prompt tokens only. It runs diffusers' generic ``AttnProcessor2_0``, which
``families.unserved_reason`` reports. Were it given one of the processors above, ``layer_reason`` tells it by what
the layer computes: a joint layer has the text's projections (``add_q_proj``, dual-stream) or no output projection
of its own (``to_out`` None, single-stream: its block projects attention and MLP together), and the refiner's has
neither (its block calls it with the text tokens as ``hidden_states`` and no ``encoder_hidden_states``).

Masks: HunyuanVideo hands attention a (B, 1, 1, S + T) boolean key mask, every video key attended (the
transformer builds it from the text mask; Framepack passes None for one prompt, its text cut to the attended
tokens); SLA serves it as its text mask, and any other mask runs the replaced processor. HunyuanVideo 1.5 hands its
processor the (B, T) text mask and attends under (valid query AND valid key): a padded text query's row is fully
masked, and torch's SDPA (diffusers' native dispatch) returns zeros for it; the SLA processor gives it zeros too.

Shapes: B batch, S video tokens, T text tokens, H heads, D head dim; diffusers hands attention (B, S, H, D) tensors
("NHD").
This module imports diffusers; ``sagesla.patch`` imports it only when called.
"""

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from sagesla.patching.processor import API, TEXT_NORMS, TEXT_PROJECTIONS, Projected, SLAProcessor, head_projections

TEXT_ONLY = "text-only attention (the token refiner over the prompt tokens) stays dense: SLA serves video tokens"
NO_TEXT = "called without encoder_hidden_states (no joint text tokens)"
UNSERVED_MASK = "an attention mask other than a boolean text key-padding mask (SLA masks text keys only)"


def _layer_reason(module: torch.nn.Module, joint: bool) -> str | None:
    """None for a joint text+video layer, ``TEXT_ONLY`` for another layer under a processor SLA reproduces; None for
    a layer under any other processor (``families.unserved_reason`` reports it)."""
    return None if joint or type(module.processor) not in API.served else TEXT_ONLY


def _hunyuan_text_mask(
    attention_mask: torch.Tensor, batch_size: int, video_length: int, length: int
) -> torch.Tensor | None:
    """The text keys attended, (B, T) bool, of HunyuanVideo's (B or 1, 1, 1, S + T) boolean key mask that attends
    every video key (``length`` = S + T); None for any other mask."""
    shapes = ((batch_size, 1, 1, length), (1, 1, 1, length))
    if attention_mask.dtype != torch.bool or attention_mask.shape not in shapes:
        return None
    keys = attention_mask[:, 0, 0]
    if not bool(keys[:, :video_length].all()):
        return None
    return keys[:, video_length:].expand(batch_size, -1)


class _HunyuanJointProcessor(SLAProcessor):
    """What the HunyuanVideo processors share: their attention (``dispatch_attention_fn`` over [video; text]) and
    output steps."""

    def dense(self, projected: Projected, parallel_config: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention the replaced processor runs (``dispatch_attention_fn`` over the [video; text] tokens, the
        mask it hands it): (video (B, S, H, D), text (B, T, H, D))."""
        query, key, value = (
            torch.cat([video, text], dim=1)
            for video, text in zip((projected.query, projected.key, projected.value), projected.text, strict=True)
        )
        out = self.dispatched(query, key, value, self.dense_mask(projected.attention_mask), parallel_config)
        length = projected.query.shape[1]
        return out[:, :length], out[:, length:]

    @staticmethod
    def dense_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask the replaced processor hands its attention, of ``Projected.attention_mask`` (HunyuanVideo's:
        the mask itself)."""
        return attention_mask

    @staticmethod
    def output(
        attn: torch.nn.Module, video_out: torch.Tensor, text_out: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The processor's last steps on the attention outputs (B, S, H, D) and (B, T, H, D): flatten the [video;
        text] rows, cast, split, ``to_out`` / ``to_add_out`` where the layer has them. Returns (video (B, S, dim),
        text (B, T, dim))."""
        text_length = text_out.shape[1]
        out = torch.cat([video_out, text_out], dim=1).flatten(2, 3).to(dtype)
        video_out, text_out = out[:, :-text_length], out[:, -text_length:]
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


class SLAHunyuanVideoAttnProcessor(_HunyuanJointProcessor):
    """Processor for a HunyuanVideo (and Framepack) joint attention layer: diffusers' projections, QK-norm and RoPE
    around ``attn.sla``.

    Each call runs the replaced ``HunyuanVideoAttnProcessor2_0``'s steps: ``to_q/to_k/to_v`` of the video (a
    single-stream layer: of the [video; text] tokens), per-head ``norm_q`` / ``norm_k``, RoPE on the video tokens,
    ``add_q_proj/add_k_proj/add_v_proj`` with ``norm_added_q`` / ``norm_added_k`` of the text (dual-stream); SLA for
    the video queries and dense attention for the text queries; then the output steps (``_HunyuanJointProcessor.
    output``). When SLA cannot serve the call it runs the very attention the replaced processor runs. See
    ``SLAProcessor`` for the attributes.
    """

    family = "hunyuan_video"

    @staticmethod
    def layer_reason(name: str, module: torch.nn.Module) -> str | None:
        """None for a dual- or single-stream block's joint attention, why the layer stays dense otherwise (the
        token refiner's text-only attention)."""
        joint = getattr(module, "add_q_proj", None) is not None or getattr(module, "to_out", None) is None
        return _layer_reason(module, joint)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: (B, S, dim) video; encoder_hidden_states: (B, T, dim) text; attention_mask: (B, 1, 1,
        S + T) bool, True for the attended keys, or None; image_rotary_emb: (cos, sin), each (S, D). Returns (video
        (B, S, dim), text (B, T, dim))."""
        if self.runs_original(NO_TEXT if encoder_hidden_states is None else None):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        batch_size, video_length, _ = hidden_states.shape
        text_mask = None
        if attention_mask is not None:
            length = video_length + encoder_hidden_states.shape[1]
            text_mask = _hunyuan_text_mask(attention_mask, batch_size, video_length, length)
            if text_mask is None:
                self.fall_back(UNSERVED_MASK)
                return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        single_stream = attn.add_q_proj is None
        tokens = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single_stream else hidden_states
        query, key, value = head_projections(attn, tokens)
        if single_stream:
            text = tuple(x[:, video_length:] for x in (query, key, value))
            query, key, value = (x[:, :video_length] for x in (query, key, value))
        else:
            text = head_projections(attn, encoder_hidden_states, TEXT_PROJECTIONS, TEXT_NORMS)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        projected = Projected(query, key, value, attention_mask, text, text_mask)
        video_out, text_out = self.attention(attn, projected)
        return self.output(attn, video_out, text_out, query.dtype)


class SLAHunyuanVideo15AttnProcessor(_HunyuanJointProcessor):
    """Processor for a HunyuanVideo 1.5 joint attention layer: diffusers' projections, QK-norm and RoPE around
    ``attn.sla``.

    Each call runs the replaced ``HunyuanVideo15AttnProcessor2_0``'s steps (``to_q/to_k/to_v`` of the video,
    per-head ``norm_q`` / ``norm_k``, RoPE, ``add_q_proj/add_k_proj/add_v_proj`` with ``norm_added_q`` /
    ``norm_added_k`` of the text, the (B, 1, S + T, S + T) mask of valid query AND valid key), SLA for the video
    queries and dense attention for the text queries, zeros for the padded text queries (a fully masked row, as
    torch's SDPA gives it), then the output steps (``_HunyuanJointProcessor.output``). When SLA cannot serve the call
    it runs the very attention the replaced processor runs. See ``SLAProcessor`` for the attributes.
    """

    family = "hunyuan_video15"

    @staticmethod
    def layer_reason(name: str, module: torch.nn.Module) -> str | None:
        """None for a block's joint attention (with the text's ``add_q_proj``), why the layer stays dense otherwise
        (the token refiner's text-only attention)."""
        return _layer_reason(module, getattr(module, "add_q_proj", None) is not None)

    @staticmethod
    def dense_mask(valid: torch.Tensor) -> torch.Tensor:
        """The mask the replaced processor hands its attention, (B, 1, S + T, S + T) bool: valid query AND valid key,
        of the (B, S + T) valid tokens."""
        batch_size, length = valid.shape
        keys = valid.view(batch_size, 1, 1, length).repeat(1, 1, length, 1)
        return keys & keys.transpose(2, 3)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: (B, S, dim) video; encoder_hidden_states: (B, T, dim) text; attention_mask: (B, T), nonzero
        for the valid text tokens (left-padded with valid tokens to S + T); image_rotary_emb: (cos, sin), each
        (S, D). Returns (video (B, S, dim), text (B, T, dim))."""
        if self.runs_original(NO_TEXT if encoder_hidden_states is None else None):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        video_length = hidden_states.shape[1]
        length = video_length + encoder_hidden_states.shape[1]
        valid = F.pad(attention_mask, (length - attention_mask.shape[1], 0), value=True).bool()
        # A mask longer than the text reaches into the video tokens, whose padded queries SLA cannot express.
        if attention_mask.shape[1] > encoder_hidden_states.shape[1] and not bool(valid[:, :video_length].all()):
            self.fall_back(UNSERVED_MASK)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = head_projections(attn, hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text_mask = valid[:, video_length:]
        text = head_projections(attn, encoder_hidden_states, TEXT_PROJECTIONS, TEXT_NORMS)
        # The (B, S + T) valid tokens: ``dense_mask`` builds the replaced processor's mask from them, (S + T)^2 per
        # batch row, only where dense attention runs.
        video_out, text_out = self.attention(attn, Projected(query, key, value, valid, text, text_mask))
        text_out = text_out.masked_fill(~text_mask[:, :, None, None], 0)
        return self.output(attn, video_out, text_out, query.dtype)
