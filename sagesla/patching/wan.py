"""SLA inside the self-attention of diffusers' Wan-family transformers.

A layer is served by what it and its processor compute, not by its class: an attention layer of Wan's shape
(``diffusers_api.LAYER_ATTRIBUTES["wan"]``) attending over its own tokens, whose processor is one of the Wan-family
processors SLA reproduces (``diffusers_api.PROCESSORS``: ``WanAttnProcessor`` of Wan, VACE, Animate and ChronoEdit,
``SkyReelsV2AttnProcessor``).

Shapes: B batch, S tokens, H heads, D head dim; diffusers hands attention (B, S, H, D) tensors ("NHD").
This module imports diffusers (through ``diffusers_api.resolve``, which fails loudly when a name it needs moved);
``sagesla.patch`` imports it only when called.
"""

import torch

from sagesla.patching import diffusers_api
from sagesla.patching.processor import API, CROSS_CALL, Projected, SLAProcessor

CROSS_ATTENTION = "cross-attention (text/image keys) stays dense"


def is_self_attention(module: torch.nn.Module) -> bool:
    """An attention layer of Wan's shape whose keys come from its own tokens (``attn1``), not from text, image or other
    conditioning (``attn2``: ``is_cross_attention`` or I2V image keys ``add_k_proj``)."""
    return (
        all(hasattr(module, name) for name in diffusers_api.LAYER_ATTRIBUTES["wan"])
        and not module.is_cross_attention
        and getattr(module, "add_k_proj", None) is None
    )


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on (B, S, H, D), mirrored from diffusers' Wan-family processors (a closure in each, so not
    importable; every served processor has the same one).

    The test suite checks, for each family, that the dense path of this processor reproduces diffusers' output bit
    for bit.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class SLAWanAttnProcessor(SLAProcessor):
    """Processor for a Wan-family self-attention layer: diffusers' projections, QK-norm and RoPE around ``attn.sla``.

    Each call runs the replaced processor's steps (its module's ``_get_qkv_projections``: ``to_q/to_k/to_v`` or the
    fused ``to_qkv``; ``norm_q``, ``norm_k``, RoPE, ``to_out``) and SLA for softmax(QK^T)V, or, when SLA cannot
    serve the call, the very attention the replaced processor runs (``dispatch_attention_fn``). See
    ``SLAProcessor`` for the attributes.
    """

    family = "wan"

    @staticmethod
    def layer_reason(name: str, module: torch.nn.Module) -> str | None:
        """None for a self-attention layer SLA serves, why it stays dense otherwise (cross-attention)."""
        return None if is_self_attention(module) else CROSS_ATTENTION

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden_states: (B, S, dim); rotary_emb: (cos, sin), each (1, S, 1, D). Returns (B, S, dim)."""
        if self.runs_original(CROSS_CALL if encoder_hidden_states is not None else None):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = API.qkv[type(self.original)](attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)
        hidden_states, _ = self.attention(attn, Projected(query, key, value, attention_mask))
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
