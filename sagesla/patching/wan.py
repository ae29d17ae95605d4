"""SLA inside the self-attention of diffusers' Wan-family transformers: which layers, and the SLA processor.

A layer is chosen by what it and its processor compute, not by its class: an attention layer of Wan's shape
(``diffusers_api.LAYER_ATTRIBUTES``) attending over its own tokens, whose processor is one of the Wan-family
processors SLA reproduces (``diffusers_api.PROCESSORS``: ``WanAttnProcessor`` of Wan, VACE, Animate and ChronoEdit,
``SkyReelsV2AttnProcessor``).

Shapes: B batch, S tokens, H heads, D head dim; diffusers hands attention (B, S, H, D) tensors ("NHD").
This module imports diffusers (through ``diffusers_api.resolve``, which fails loudly when a name it needs moved);
``sagesla.patch`` imports it only when called.
"""

import logging
from collections.abc import Callable

import torch

from sagesla import ops, validation
from sagesla.patching import diffusers_api
from sagesla.patching.checkpoints import SLA_ATTRIBUTE
from sagesla.patching.timesteps import TimestepTracker
from sagesla.profile import LayerSpec

logger = logging.getLogger("sagesla")

API = diffusers_api.resolve()
diffusers_api.warn_if_untested()
dispatch_attention_fn = API.core["dispatch_attention_fn"]
_templated_context_parallel_attention = API.core["_templated_context_parallel_attention"]

CROSS_ATTENTION = "cross-attention (text/image keys) stays dense"
# ``last_fallback`` of a call that ran the original processor because its timestep lies in ``dense_steps``.
DENSE_STEPS = "dense_steps: the timestep lies in a dense range"


def is_attention_layer(module: torch.nn.Module) -> bool:
    """An attention layer of Wan's shape: q/k/v/out projections, QK-norms, heads, a processor."""
    return all(hasattr(module, name) for name in diffusers_api.LAYER_ATTRIBUTES)


def is_self_attention(module: torch.nn.Module) -> bool:
    """An attention layer of Wan's shape whose keys come from its own tokens (``attn1``), not from text, image or other
    conditioning (``attn2``: ``is_cross_attention`` or I2V image keys ``add_k_proj``)."""
    return is_attention_layer(module) and not module.is_cross_attention and getattr(module, "add_k_proj", None) is None


def is_wan_family(module: torch.nn.Module) -> bool:
    """An attention layer of Wan's shape that runs a Wan-family processor (SLA's included), or whose class defaults to
    one (a layer of a Wan-family model under a processor someone else set)."""
    if not is_attention_layer(module):
        return False
    known = API.served.keys() | API.skipped.keys()
    default = getattr(type(module), "_default_processor_cls", None)
    return isinstance(module.processor, SLAWanAttnProcessor) or type(module.processor) in known or default in known


def unserved_reason(module: torch.nn.Module) -> str | None:
    """Why SLA cannot serve this self-attention layer's processor, None where it reproduces it (exact type)."""
    kind = type(module.processor)
    if kind in API.served:
        return None
    if kind in API.skipped:
        return API.skipped[kind]
    served = sorted({processor.__name__ for processor in API.served})
    return (
        f"its processor {kind.__module__}.{kind.__qualname__} is not one SLA reproduces ({', '.join(served)} are), "
        "so the layer stays as it is"
    )


def head_dim(module: torch.nn.Module) -> int:
    """The head dim of an attention layer of Wan's shape: ``to_q``'s outputs over its heads."""
    return module.to_q.out_features // module.heads


def layer_spec(name: str, module: torch.nn.Module) -> LayerSpec:
    """The fingerprint entry of a self-attention layer: (name, heads, head_dim)."""
    return LayerSpec(name, module.heads, head_dim(module))


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


def _ulysses_degree(parallel_config) -> int | None:
    """Ranks a Ulysses all-to-all spreads each sequence over: 1 without context parallelism, None with ring attention
    (which SLA cannot serve)."""
    config = getattr(parallel_config, "context_parallel_config", None)
    if config is None:
        return 1
    return config.ulysses_degree if config.ring_degree == 1 else None


def _on_original(name: str) -> property:
    """A property that reads and writes attribute ``name`` of the processor's ``original``."""
    return property(
        lambda self: getattr(self.original, name, None), lambda self, value: setattr(self.original, name, value)
    )


def _by_bucket(index: torch.Tensor, topks: tuple[float, ...], attend: Callable[[float], torch.Tensor]) -> torch.Tensor:
    """``attend(topks[index])`` for a 0-d device ``index``, without reading it on the host (``torch.cond``)."""
    if len(topks) == 1:
        return attend(topks[0])
    return torch.cond(index == 0, lambda: attend(topks[0]), lambda: _by_bucket(index - 1, topks[1:], attend), ())


class SLAWanAttnProcessor:
    """Processor for a Wan-family self-attention layer: diffusers' projections, QK-norm and RoPE around ``attn.sla``.

    The layer's SLA module (``SageSparseLinearAttention`` or ``SparseLinearAttention``, ``tensor_layout="NHD"``)
    is the submodule ``attn.sla``. Each call runs the replaced processor's steps (its module's
    ``_get_qkv_projections``: ``to_q/to_k/to_v`` or the fused ``to_qkv``; ``norm_q``, ``norm_k``, RoPE, ``to_out``)
    and SLA for softmax(QK^T)V, or, when SLA cannot serve the call, the very attention the replaced processor runs
    (``dispatch_attention_fn``), logging the reason once per layer: the dense fallback computes what the unpatched
    model computes, bit for bit.

    Attributes:
        original: the processor this one replaced (``sagesla.unpatch`` restores it), one of the processors
            ``diffusers_api.PROCESSORS`` serves (exact type).
        layer_name: the layer's module name, for log lines.
        bucket_topk: topk per timestep bucket of ``timesteps``, handed to ``attn.sla`` with each call (the module
            is never written, so threads sampling at different timesteps each get their own); None to run
            ``attn.sla.topk``.
        timesteps: the tracker of the running forward's timestep (with ``bucket_topk``, or with
            ``timesteps.dense_ranges``: ``patch(..., dense_steps=...)``). A call whose forward's timestep lies in one
            of its ``dense_ranges`` runs the original processor, in eager mode (bit for bit the unpatched layer); a
            compiled graph keeps the processor's steps and picks dense attention (``dispatch_attention_fn``) or SLA
            on the device (``torch.cond``).
        observer: when set (calibration), every call SLA could serve runs dense attention instead and hands it to
            ``observer(layer_name, attn.sla, query, key, value, dense)``, all (B, S, H, D); ``last_sparsity`` and
            ``last_fallback`` then change only on a fallback.
        last_sparsity: fraction of block pairs the last call skipped (0.0 after a dense call), None before any call
            and after a compiled call whose topk or dense / sparse choice follows the timestep (chosen on the
            device).
        last_fallback: why the last call ran dense attention, or None if it ran SLA.
    """

    def __init__(
        self,
        original: object,
        layer_name: str,
        check_finite: bool = False,
        bucket_topk: tuple[float, ...] | None = None,
        timesteps: TimestepTracker | None = None,
    ):
        if type(original) not in API.served:
            raise TypeError(
                f"SLAWanAttnProcessor reproduces {sorted({kind.__name__ for kind in API.served})} only, got "
                f"{type(original).__module__}.{type(original).__qualname__}"
            )
        self.original = original
        self._qkv_projections = API.served[type(original)]
        self.layer_name = layer_name
        self.check_finite = check_finite
        self.bucket_topk = bucket_topk
        self.timesteps = timesteps
        self.observer: Callable[..., None] | None = None
        self.last_sparsity: float | None = None
        self.last_fallback: str | None = None
        self._logged: set[str] = set()

    # diffusers' set_attention_backend / enable_parallelism set these on every processor. Keeping them on the
    # original processor makes the dense path honour them, while patched and after unpatch.
    _attention_backend = _on_original("_attention_backend")
    _parallel_config = _on_original("_parallel_config")

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden_states: (B, S, dim); rotary_emb: (cos, sin), each (1, S, 1, D). Returns (B, S, dim)."""
        if encoder_hidden_states is not None:
            self._fall_back("keys and values from encoder_hidden_states (cross-attention)")
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if self.timesteps is not None and not torch.compiler.is_compiling() and self.timesteps.is_dense:
            self.last_fallback, self.last_sparsity = DENSE_STEPS, 0.0
            return self.original(attn, hidden_states, None, attention_mask, rotary_emb)
        query, key, value = self._qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)

        sla = getattr(attn, SLA_ATTRIBUTE)
        reason = self._fallback_reason(sla, query, key, value, attention_mask)
        if reason is None and self.observer is None:
            hidden_states, self.last_sparsity = self._run_sla(sla, query, key, value)
            self.last_fallback = None
        else:
            if reason is not None:
                self._fall_back(reason)
            hidden_states = self._dense(query, key, value, attention_mask, self._parallel_config)
            if reason is None:
                self.observer(self.layer_name, sla, query, key, value, hidden_states)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)

    def _dense(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        parallel_config: object = None,
    ) -> torch.Tensor:
        """The attention the replaced processor runs (diffusers' ``dispatch_attention_fn``), (B, S, H, D)."""
        return dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=parallel_config,
        )

    def _fallback_reason(
        self,
        sla: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> str | None:
        """Why SLA cannot serve this call, or None. query, key, value: (B, S, H, D)."""
        if attention_mask is not None:
            return "an attention mask was given (SLA attends without masks)"
        ulysses = _ulysses_degree(self._parallel_config)
        if ulysses is None:
            return "ring attention is on (it splits the keys across ranks; SLA's block selection needs them all)"
        if query.dtype not in validation.INPUT_DTYPES:
            return f"dtype {query.dtype} (SLA serves float16, bfloat16 and float32)"
        length = query.shape[1] * ulysses
        settings = sla.settings.resolve(query.device)
        if length < max(settings.block_q, settings.block_k):
            return f"sequence length {length} is shorter than one {settings.block_q}x{settings.block_k} block"
        if settings.backend == "triton" or (settings.backend == "auto" and query.device.type == "cuda"):
            unsupported = ops.triton_unsupported_reason(query.transpose(1, 2), settings)
            if unsupported is not None:
                return f"backend={sla.backend!r} cannot serve it: {unsupported}"
        if self.check_finite and not all(bool(torch.isfinite(x).all()) for x in (query, key, value)):
            return "query, key or value holds NaN/Inf"
        return None

    def _run_sla(
        self, sla: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """(SLA's output (B, S, H, D), fraction of block pairs skipped) for (B, S, H, D) inputs.

        Under Ulysses context parallelism (``sagesla.parallel.enable_ulysses``) the input holds this rank's S / N
        tokens of every head: diffusers' templated attention exchanges them all-to-all so that SLA sees all tokens of
        H / N heads, in their global order (the very selection, quantisation and ``proj_l`` of one GPU), and
        exchanges the output back.
        """
        if _ulysses_degree(self._parallel_config) == 1:
            return self._attend(sla, query, key, value)
        sparsity = []

        def forward_op(ctx, q, k, v, *args, **kwargs):
            out, skipped = self._attend(sla, q, k, v)
            sparsity.append(skipped)
            return out

        def backward_op(ctx, grad_out):
            raise NotImplementedError(
                f"sagesla: {self.layer_name}: SLA under context parallelism serves inference only (no backward)"
            )

        out = _templated_context_parallel_attention(
            query, key, value, forward_op=forward_op, backward_op=backward_op, _parallel_config=self._parallel_config
        )
        return out, sparsity[0]

    def _attend(
        self, sla: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, float | None]:
        """``sla`` at this call's topk: (output, fraction of block pairs skipped, None where chosen on the device).

        Compiled with ``dense_steps``, the graph holds dense attention and SLA and picks one on the device (eager
        mode runs a dense step's call through the original processor before it gets here). Under Ulysses this runs
        between the all-to-all exchanges, on all tokens of this rank's heads, so dense attention there is local.
        """
        timesteps = self.timesteps
        if (
            timesteps is not None
            and timesteps.dense_ranges
            and timesteps.timestep is not None
            and torch.compiler.is_compiling()
        ):
            dense = timesteps.dense_flag(timesteps.timestep)
            return torch.cond(
                dense, lambda: self._dense(query, key, value), lambda: self._sparse(sla, query, key, value), ()
            ), None
        return self._sparse_with_sparsity(sla, query, key, value)

    def _sparse(
        self, sla: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """SLA's output alone, for a compiled graph's ``torch.cond`` branch."""
        return self._sparse_with_sparsity(sla, query, key, value)[0]

    def _sparse_with_sparsity(
        self, sla: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, float | None]:
        """``sla`` at this call's topk (its bucket's with ``bucket_topk``): (output, fraction of block pairs skipped,
        None where chosen on the device)."""
        if self.bucket_topk is None:
            return sla(query, key, value, return_sparsity=True)
        timestep = self.timesteps.timestep
        if timestep is None:
            if not torch.compiler.is_compiling():
                self._log_once("no timestep seen in this forward: using the largest topk of its buckets")
            return sla(query, key, value, return_sparsity=True, topk=max(self.bucket_topk))
        if not torch.compiler.is_compiling():
            return sla(query, key, value, return_sparsity=True, topk=self.bucket_topk[self.timesteps.bucket])
        # Compiled: the bucket is data, so the graph holds every bucket's call and picks one on the device.
        index = self.timesteps.bucket_index(timestep)
        return _by_bucket(index, self.bucket_topk, lambda topk: sla(query, key, value, topk=topk)), None

    def _fall_back(self, reason: str) -> None:
        """Record a dense call and log its reason once per layer and reason."""
        self.last_fallback, self.last_sparsity = reason, 0.0
        self._log_once(f"runs dense attention: {reason}")

    def _log_once(self, message: str) -> None:
        """Log a WARNING naming this layer, once per layer and message."""
        if message not in self._logged:
            self._logged.add(message)
            logger.warning("sagesla: %s %s", self.layer_name, message)
