"""SLA inside the video self-attention of diffusers' LTX-Video and LTX-2 transformers.

Served: ``transformer_blocks.{i}.attn1``, the video self-attention of each block, under the processors SLA reproduces
(``diffusers_api.PROCESSORS``: ``LTXVideoAttnProcessor`` of ``LTXVideoTransformer3DModel``,
``LTX2AudioVideoAttnProcessor`` and ``LTX2PerturbedAttnProcessor`` of ``LTX2VideoTransformer3DModel``). Dense, as
they are:

- ``attn2`` (both models) and ``audio_attn2`` (LTX-2): cross-attention, keys from the prompt.
- ``audio_attn1`` (LTX-2): self-attention over the audio tokens (about 25 a second of audio); SLA serves the video
  tokens.
- ``audio_to_video_attn`` / ``video_to_audio_attn`` (LTX-2): cross-attention, keys from the other stream.
- a layer under a processor SLA does not reproduce: ``families.unserved_reason`` reports it.

A layer's role is told by its name within its block, not by its shape: ``attn1`` and ``attn2`` are the same class,
with the same processor and attributes, and ``attn2``'s key input width (``cross_attention_dim``) equals the model
width in the released configs (the prompt is projected to it), so nothing but the block's forward tells them apart:
it calls ``attn1`` without ``encoder_hidden_states`` and ``attn2`` with the prompt. A call with
``encoder_hidden_states`` runs the original processor whatever the name, so a layer misnamed still computes what it
computed.

``LTX2PerturbedAttnProcessor`` (``perturbed_attn=True``: LTX-2.3, LTX-2.5) serves spatio-temporal guidance: in the
blocks the forward's ``spatio_temporal_guidance_blocks`` names, a call blends the attention output with the values,
``lerp(v, attention, perturbation_mask)`` (the mask (B, 1, 1): 0 perturbs a sample, 1 keeps its attention); SLA
takes the attention's place. A call whose mask is 0 everywhere (``all_perturbed``) runs no attention at all: the
original processor computes it (the values through the gates and ``to_out``). Without a mask a call computes what
``LTX2AudioVideoAttnProcessor`` computes.

Shapes: B batch, S tokens, H heads, D head dim; diffusers hands attention (B, S, H, D) tensors ("NHD").
This module imports diffusers; ``sagesla.patch`` imports it only when called.
"""

from collections.abc import Callable

import torch
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from sagesla.patching.processor import CROSS_CALL, Projected, SLAProcessor, prepared_mask

SELF_ATTENTION = "attn1"
TEXT_CROSS_ATTENTION = "cross-attention (text keys) stays dense"
AUDIO_SELF_ATTENTION = "audio self-attention stays dense (SLA serves video tokens)"
AUDIO_VIDEO_CROSS_ATTENTION = "audio<->video cross-attention (keys from the other stream) stays dense"
OTHER_LAYER = "not the video self-attention (attn1) of a transformer block, stays dense"
# ``last_fallback`` of an all-perturbed call, which runs no attention.
ALL_PERTURBED = "all_perturbed: the values stand in for the attention (no attention to run)"

LTX_DENSE_LAYERS = {"attn2": TEXT_CROSS_ATTENTION}
LTX2_DENSE_LAYERS = {
    "attn2": TEXT_CROSS_ATTENTION,
    "audio_attn2": TEXT_CROSS_ATTENTION,
    "audio_attn1": AUDIO_SELF_ATTENTION,
    "audio_to_video_attn": AUDIO_VIDEO_CROSS_ATTENTION,
    "video_to_audio_attn": AUDIO_VIDEO_CROSS_ATTENTION,
}


def _layer_reason(name: str, dense_layers: dict[str, str]) -> str | None:
    """None for a block's ``attn1``, why the layer stays dense otherwise (by its name within its block)."""
    role = name.rsplit(".", 1)[-1]
    return None if role == SELF_ATTENTION else dense_layers.get(role, OTHER_LAYER)


def _ltx2_rotary_emb(rope_type: str) -> Callable | None:
    """diffusers' LTX-2 RoPE function for a layer's ``rope_type`` ("interleaved" pairs or "split" halves), or None
    for another type (the replaced processor then leaves q and k as they are)."""
    # Imported on use: transformer_ltx2 exists from diffusers 0.37 on, and patch serves the other families before.
    from diffusers.models.transformers import transformer_ltx2

    return {
        "interleaved": transformer_ltx2.apply_interleaved_rotary_emb,
        "split": transformer_ltx2.apply_split_rotary_emb,
    }.get(rope_type)


class _LTXFamilyProcessor(SLAProcessor):
    """What the LTX and LTX-2 processors share: their projection steps (their attention is ``SLAProcessor.dense``)."""

    @staticmethod
    def projections(attn: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``to_q`` / ``to_k`` / ``to_v`` of the tokens, then ``norm_q`` / ``norm_k`` over all heads: (B, S, H*D)."""
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        return attn.norm_q(query), attn.norm_k(key), value

    @staticmethod
    def output(attn: torch.nn.Module, out: torch.Tensor) -> torch.Tensor:
        """``to_out`` of the attention output (B, S, H, D): (B, S, dim)."""
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3)))


class SLALTXAttnProcessor(_LTXFamilyProcessor):
    """Processor for an LTX-Video self-attention layer: diffusers' projections, QK-norm and RoPE around ``attn.sla``.

    Each call runs the replaced ``LTXVideoAttnProcessor``'s steps (``to_q/to_k/to_v``, ``norm_q`` / ``norm_k`` over
    all heads, LTX's interleaved RoPE on (B, S, H*D), unflatten into heads, ``to_out``) and SLA for softmax(QK^T)V,
    or, when SLA cannot serve the call, the very attention the replaced processor runs. See ``SLAProcessor`` for the
    attributes.
    """

    family = "ltx"

    @staticmethod
    def layer_reason(name: str, module: torch.nn.Module) -> str | None:
        """None for a block's video self-attention (``attn1``), why the layer stays dense otherwise."""
        return _layer_reason(name, LTX_DENSE_LAYERS)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden_states: (B, S, dim); image_rotary_emb: (cos, sin), each (B, S, H*D). Returns (B, S, dim)."""
        if self.runs_original(CROSS_CALL if encoder_hidden_states is not None else None):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = self.projections(attn, hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        mask = None if attention_mask is None else prepared_mask(attn, attention_mask, *hidden_states.shape[:2])
        out, _ = self.attention(attn, Projected(query, key, value, mask))
        return self.output(attn, out.to(query.dtype))


class SLALTX2AttnProcessor(_LTXFamilyProcessor):
    """Processor for an LTX-2 video self-attention layer: diffusers' projections, QK-norm and RoPE around ``attn.sla``.

    Each call runs the replaced ``LTX2AudioVideoAttnProcessor``'s steps (``to_q/to_k/to_v``, ``norm_q`` / ``norm_k``
    over all heads, the RoPE of the layer's ``rope_type`` with the query's and the key's own rotary embeddings,
    unflatten into heads, per-head gates ``2 sigmoid(to_gate_logits(x))`` where the layer has them, ``to_out``) and
    SLA for softmax(QK^T)V, or, when SLA cannot serve the call, the very attention the replaced processor runs. See
    ``SLAProcessor`` for the attributes.
    """

    family = "ltx2"

    @staticmethod
    def layer_reason(name: str, module: torch.nn.Module) -> str | None:
        """None for a block's video self-attention (``attn1``), why the layer stays dense otherwise (audio
        self-attention, cross-attention)."""
        return _layer_reason(name, LTX2_DENSE_LAYERS)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden_states: (B, S, dim); query_rotary_emb / key_rotary_emb: (cos, sin), each (B, S, H*D)
        ("interleaved") or (B, H, S, D/2) ("split"); the key's defaults to the query's. Returns (B, S, dim)."""
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb, key_rotary_emb)
        if self.runs_original(CROSS_CALL if encoder_hidden_states is not None else None):
            return self.original(*args)
        _, out = self.video_attention(attn, hidden_states, attention_mask, query_rotary_emb, key_rotary_emb)
        return self.gated_output(attn, hidden_states, out)

    def video_attention(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The replaced processor's steps up to its attention, then SLA (or that attention): (value, attention output
        in the query's dtype), each (B, S, H, D)."""
        query, key, value = self.projections(attn, hidden_states)
        rotary_emb = _ltx2_rotary_emb(attn.rope_type)
        if query_rotary_emb is not None and rotary_emb is not None:
            query = rotary_emb(query, query_rotary_emb)
            key = rotary_emb(key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        mask = None if attention_mask is None else prepared_mask(attn, attention_mask, *hidden_states.shape[:2])
        out, _ = self.attention(attn, Projected(query, key, value, mask))
        return value, out.to(query.dtype)

    def gated_output(self, attn: torch.nn.Module, hidden_states: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The per-head gates of the layer's input (B, S, dim), where it has them, on ``out`` (B, S, H, D), then
        ``to_out``: (B, S, dim)."""
        if attn.to_gate_logits is not None:
            # (B, S, H): 1 for zero logits.
            gates = 2.0 * torch.sigmoid(attn.to_gate_logits(hidden_states))
            out = out * gates.unsqueeze(-1)
        return self.output(attn, out)


class SLALTX2PerturbedAttnProcessor(SLALTX2AttnProcessor):
    """Processor for an LTX-2 video self-attention layer under ``LTX2PerturbedAttnProcessor`` (``perturbed_attn=True``
    models): the steps of ``SLALTX2AttnProcessor``, and in a spatio-temporal guidance block the replaced processor's
    blend of the values with the attention output, ``lerp(v, attention, perturbation_mask)``. A call with every
    weight 0 (``all_perturbed``) runs no attention: the replaced processor computes it, with ``last_fallback``
    ``ALL_PERTURBED``. See ``SLAProcessor`` for the attributes.
    """

    family = "ltx2_perturbed"

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        perturbation_mask: torch.Tensor | None = None,
        all_perturbed: bool | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As ``SLALTX2AttnProcessor``; perturbation_mask: the attention output's weight against the values,
        broadcast to (B, S, H*D) (the transformer hands (B, 1, 1)), or None for the attention alone; all_perturbed:
        whether every weight is 0 (0-d bool tensor or bool), from ``perturbation_mask`` where None. Returns
        (B, S, dim)."""
        args = (
            attn,
            hidden_states,
            encoder_hidden_states,
            attention_mask,
            query_rotary_emb,
            key_rotary_emb,
            perturbation_mask,
            all_perturbed,
        )
        if self.runs_original(CROSS_CALL if encoder_hidden_states is not None else None):
            return self.original(*args)
        if all_perturbed is None:
            all_perturbed = perturbation_mask is not None and torch.all(perturbation_mask == 0)
        if all_perturbed:
            self.last_fallback, self.last_sparsity = ALL_PERTURBED, 0.0
            return self.original(*args)
        value, out = self.video_attention(attn, hidden_states, attention_mask, query_rotary_emb, key_rotary_emb)
        if perturbation_mask is not None:
            # On (B, S, H*D), where the mask broadcasts as in the replaced processor.
            out = torch.lerp(value.flatten(2, 3), out.flatten(2, 3), perturbation_mask).unflatten(2, (attn.heads, -1))
        return self.gated_output(attn, hidden_states, out)
