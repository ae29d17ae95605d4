"""The SLA processor families and which attention layers of a model they serve.

Each family's SLA processor class (``family`` = its key in ``diffusers_api.PROCESSORS``) reproduces the diffusers
processors of that family; ``layer_reason(name, module)`` tells which of their layers SLA serves (a model's
self-attention) and why the others stay dense (cross-attention, ...).

This module imports diffusers; ``sagesla.patch`` imports it only when called.
"""

import torch

from sagesla.patching.cogvideox import SLACogVideoXAttnProcessor
from sagesla.patching.diffusers_api import PROCESSORS
from sagesla.patching.hunyuan_video import SLAHunyuanVideo15AttnProcessor, SLAHunyuanVideoAttnProcessor
from sagesla.patching.ltx import SLALTX2AttnProcessor, SLALTX2PerturbedAttnProcessor, SLALTXAttnProcessor
from sagesla.patching.mochi import SLAMochiAttnProcessor
from sagesla.patching.processor import API, SLAProcessor, head_dim
from sagesla.patching.wan import SLAWanAttnProcessor
from sagesla.profile import LayerSpec

SLA_PROCESSORS: dict[str, type[SLAProcessor]] = {
    cls.family: cls
    for cls in (
        SLAWanAttnProcessor,
        SLALTXAttnProcessor,
        SLALTX2AttnProcessor,
        SLALTX2PerturbedAttnProcessor,
        SLAHunyuanVideoAttnProcessor,
        SLAHunyuanVideo15AttnProcessor,
        SLACogVideoXAttnProcessor,
        SLAMochiAttnProcessor,
    )
}
# The diffusers models whose attention some family serves, for error messages.
MODELS = ", ".join(dict.fromkeys(model for entry in PROCESSORS if entry.skipped is None for model in entry.models))

__all__ = ["MODELS", "SLA_PROCESSORS", "SLAProcessor", "head_dim"]


def sla_processor(processor: object) -> type[SLAProcessor]:
    """The SLA processor class that reproduces a served diffusers processor."""
    return SLA_PROCESSORS[API.served[type(processor)].family]


def family_of(module: torch.nn.Module) -> str | None:
    """The family of an attention layer: of its processor (SLA's included), or of the processor its class defaults
    to (a layer of a served model under a processor someone else set); None for a layer no family knows."""
    processor = getattr(module, "processor", None)
    if processor is None or not hasattr(module, "heads"):
        return None
    if isinstance(processor, SLAProcessor):
        return processor.family
    for kind in (type(processor), getattr(type(module), "_default_processor_cls", None)):
        entry = API.served.get(kind) or API.skipped.get(kind)
        if entry is not None:
            return entry.family
    return None


def unserved_reason(module: torch.nn.Module) -> str | None:
    """Why SLA cannot serve this layer's processor, None where it reproduces it (exact type)."""
    kind = type(module.processor)
    if kind in API.served:
        return None
    if kind in API.skipped:
        return API.skipped[kind].skipped
    served = sorted({processor.__name__ for processor in API.served})
    return (
        f"its processor {kind.__module__}.{kind.__qualname__} is not one SLA reproduces ({', '.join(served)} are), "
        "so the layer stays as it is"
    )


def layer_spec(name: str, module: torch.nn.Module) -> LayerSpec:
    """The fingerprint entry of a self-attention layer: (name, heads, head_dim)."""
    return LayerSpec(name, module.heads, head_dim(module))
