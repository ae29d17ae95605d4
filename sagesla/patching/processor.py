"""What every SLA attention processor shares: the choice between SLA and dense attention for a call, the topk of
the call (timestep buckets, ``dense_steps``), Ulysses context parallelism, the calibration observer and the log.

A family's processor (``wan.SLAWanAttnProcessor``, ``ltx.SLALTXAttnProcessor``, ``joint.*``) mirrors the steps of
the diffusers processor it replaces around the attention: it turns a call into a ``Projected`` (q, k, v after the
projections, QK-norm and RoPE; a joint model's text tokens beside them), hands it to ``attention``, and finishes
the outputs as the replaced processor does. Its ``dense`` computes the replaced processor's own attention on a
``Projected``, bit for bit.

Shapes: B batch, S tokens (a joint model's video tokens), T text tokens, H heads, D head dim; (B, S, H, D) is
diffusers' "NHD".
"""

import dataclasses
import logging
from collections.abc import Callable

import torch

from sagesla import ops, validation
from sagesla.patching import diffusers_api
from sagesla.patching.checkpoints import SLA_ATTRIBUTE
from sagesla.patching.timesteps import TimestepTracker

logger = logging.getLogger("sagesla")

API = diffusers_api.resolve()
diffusers_api.warn_if_untested()
dispatch_attention_fn = API.core["dispatch_attention_fn"]
_templated_context_parallel_attention = API.core["_templated_context_parallel_attention"]

# ``last_fallback`` of a call that ran the original processor because its timestep lies in ``dense_steps``.
DENSE_STEPS = "dense_steps: the timestep lies in a dense range"
# Why a self-attention layer's call with keys from another stream runs the original processor.
CROSS_CALL = "keys and values from encoder_hidden_states (cross-attention)"


@dataclasses.dataclass
class Projected:
    """One attention call after the replaced processor's projections, QK-norm and RoPE.

    Attributes:
        query, key, value: (B, S, H, D), the tokens SLA attends over (a joint model's video tokens).
        attention_mask: the mask the replaced processor hands its attention (``dense`` uses it); SLA serves a call
            with one only where it is a joint model's text mask (``text_mask``).
        text: a joint model's text tokens (query, key, value), each (B, T, H, D), or None.
        text_mask: (B, T) bool, the text keys attended (True), or None for all.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None = None
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    text_mask: torch.Tensor | None = None


def head_dim(module: torch.nn.Module) -> int:
    """The head dim of an attention layer: ``to_q``'s outputs over its heads."""
    return module.to_q.out_features // module.heads


def ulysses_degree(parallel_config) -> int | None:
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


# A joint model's text projections and their per-head norms (``head_projections``).
TEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj")
TEXT_NORMS = ("norm_added_q", "norm_added_k")


def head_projections(
    attn: torch.nn.Module,
    tokens: torch.Tensor,
    projections: tuple[str, str, str] = ("to_q", "to_k", "to_v"),
    norms: tuple[str, str] = ("norm_q", "norm_k"),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of ``tokens`` (B, N, dim) by the layer's ``projections``, unflattened to (B, N, H, D), then q and k
    through the layer's per-head ``norms`` where it has them (``TEXT_PROJECTIONS`` and ``TEXT_NORMS`` for a joint
    model's text)."""
    query, key, value = (getattr(attn, name)(tokens).unflatten(2, (attn.heads, -1)) for name in projections)
    norm_q, norm_k = (getattr(attn, name) for name in norms)
    return query if norm_q is None else norm_q(query), key if norm_k is None else norm_k(key), value


def prepared_mask(attn: torch.nn.Module, attention_mask: torch.Tensor, batch_size: int, length: int) -> torch.Tensor:
    """A layer's mask as diffusers' older processors hand it to attention: ``prepare_attention_mask`` viewed as
    (B, H, Q, K)."""
    attention_mask = attn.prepare_attention_mask(attention_mask, length, batch_size)
    return attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])


def joint_text_attention(projected: Projected) -> torch.Tensor:
    """The text queries' dense attention over every video key and the attended text keys, (B, T, H, D)."""
    text_query, text_key, text_value = projected.text
    key = torch.cat([projected.key, text_key], dim=1).transpose(1, 2)
    value = torch.cat([projected.value, text_value], dim=1).transpose(1, 2)
    mask = None
    if projected.text_mask is not None:
        video = projected.text_mask.new_ones(projected.key.shape[:2])
        mask = torch.cat([video, projected.text_mask], dim=1)[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(text_query.transpose(1, 2), key, value, attn_mask=mask)
    return out.transpose(1, 2)


class SLAProcessor:
    """Base of the SLA processors: runs SLA, or dense attention where SLA cannot serve a call, on a ``Projected``.

    The layer's SLA module (``SageSparseLinearAttention`` or ``SparseLinearAttention``, ``tensor_layout="NHD"``)
    is the submodule ``attn.sla``. A call SLA cannot serve runs the replaced processor's attention (``dense``),
    logging the reason once per layer: the dense fallback computes what the unpatched model computes, bit for bit.

    A joint text+video call (``Projected.text``): every video query attends its selected video key blocks and every
    attended text key in one softmax (SLA's ``exact_kv``), plus SLA's linear branch over the video keys; every text
    query attends densely (``joint_text_attention``).

    Attributes:
        original: the processor this one replaced (``sagesla.unpatch`` restores it), of a type the family serves
            (``diffusers_api.PROCESSORS``).
        layer_name: the layer's module name, for log lines.
        bucket_topk: topk per timestep bucket of ``timesteps``, handed to ``attn.sla`` with each call (the module
            is never written, so threads sampling at different timesteps each get their own); None to run
            ``attn.sla.topk``.
        timesteps: the tracker of the running forward's timestep (with ``bucket_topk``, or with
            ``timesteps.dense_ranges``: ``patch(..., dense_steps=...)``). A call whose forward's timestep lies in one
            of its ``dense_ranges`` runs the original processor, in eager mode (bit for bit the unpatched layer); a
            compiled graph keeps the processor's steps and picks dense attention or SLA on the device
            (``torch.cond``).
        observer: when set (calibration), every call SLA could serve runs dense attention instead and hands it to
            ``observer(layer_name, attn.sla, query, key, value, dense, **exact)``, tensors (B, S, H, D), ``exact``
            SLA's ``exact_kv`` / ``exact_mask`` of a joint call; ``last_sparsity`` and ``last_fallback`` then
            change only on a fallback.
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
        served = [kind for kind, entry in API.served.items() if entry.family == self.family]
        if type(original) not in served:
            raise TypeError(
                f"{type(self).__name__} reproduces {sorted(kind.__name__ for kind in served)} only, got "
                f"{type(original).__module__}.{type(original).__qualname__}"
            )
        self.original = original
        self.layer_name = layer_name
        self.check_finite = check_finite
        self.bucket_topk = bucket_topk
        self.timesteps = timesteps
        self.observer: Callable[..., None] | None = None
        self.last_sparsity: float | None = None
        self.last_fallback: str | None = None
        self._logged: set[str] = set()

    # The key of the family in ``diffusers_api.PROCESSORS`` whose processors this class reproduces.
    family: str = ""

    # diffusers' set_attention_backend / enable_parallelism set these on every processor. Keeping them on the
    # original processor makes the dense path honour them, while patched and after unpatch.
    _attention_backend = _on_original("_attention_backend")
    _parallel_config = _on_original("_parallel_config")

    def dense(self, projected: Projected, parallel_config: object = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The replaced processor's attention on ``projected`` (under ``parallel_config``): (video / self output
        (B, S, H, D), text output (B, T, H, D) or None), before its output projection.

        This one is a self-attention processor's that dispatches (Wan, LTX); joint families override it.
        """
        query, key, value = projected.query, projected.key, projected.value
        return self.dispatched(query, key, value, projected.attention_mask, parallel_config), None

    def dispatched(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        parallel_config: object = None,
    ) -> torch.Tensor:
        """diffusers' ``dispatch_attention_fn`` as the replaced processor calls it (its attention backend), (B, S, H,
        D) in and out."""
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

    def runs_original(self, reason: str | None = None) -> bool:
        """Whether this call goes whole to the original processor: ``reason``, why SLA cannot serve it at all (a
        fallback, logged), or its forward lies in ``dense_steps`` (eager; recorded as the call's fallback)."""
        if reason is not None:
            self.fall_back(reason)
            return True
        if self.timesteps is None or torch.compiler.is_compiling() or not self.timesteps.is_dense:
            return False
        self.last_fallback, self.last_sparsity = DENSE_STEPS, 0.0
        return True

    def attention(self, attn: torch.nn.Module, projected: Projected) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SLA, or the dense attention where SLA cannot serve the call: (video / self output (B, S, H, D), text
        output (B, T, H, D) or None)."""
        sla = getattr(attn, SLA_ATTRIBUTE)
        reason = self._fallback_reason(sla, projected)
        if reason is None and self.observer is None:
            out, self.last_sparsity = self._run_sla(sla, projected)
            self.last_fallback = None
            return out, None if projected.text is None else joint_text_attention(projected)
        if reason is not None:
            self.fall_back(reason)
        out, text_out = self.dense(projected, self._parallel_config)
        if reason is None:
            self.observer(
                self.layer_name, sla, projected.query, projected.key, projected.value, out, **_exact(projected)
            )
        return out, text_out

    def _fallback_reason(self, sla: torch.nn.Module, projected: Projected) -> str | None:
        """Why SLA cannot serve this call, or None."""
        query, key, value = projected.query, projected.key, projected.value
        if projected.attention_mask is not None and projected.text is None:
            return "an attention mask was given (SLA attends without masks)"
        ulysses = ulysses_degree(self._parallel_config)
        if ulysses is None:
            return "ring attention is on (it splits the keys across ranks; SLA's block selection needs them all)"
        if ulysses > 1 and projected.text is not None:
            return "context parallelism with joint text attention (SLA serves it on one GPU)"
        if query.dtype not in validation.INPUT_DTYPES:
            return f"dtype {query.dtype} (SLA serves float16, bfloat16 and float32)"
        length = query.shape[1] * ulysses
        settings = sla.settings.resolve(query.device)
        if length < max(settings.block_q, settings.block_k):
            return f"sequence length {length} is shorter than one {settings.block_q}x{settings.block_k} block"
        if settings.backend == "triton" or (settings.backend == "auto" and query.device.type == "cuda"):
            has_exact = projected.text is not None
            unsupported = ops.triton_unsupported_reason(query.transpose(1, 2), settings, has_exact=has_exact)
            if unsupported is not None:
                return f"backend={sla.backend!r} cannot serve it: {unsupported}"
        tensors = (query, key, value, *(projected.text or ()))
        if self.check_finite and not all(bool(torch.isfinite(x).all()) for x in tensors):
            return "query, key or value holds NaN/Inf"
        return None

    def _run_sla(self, sla: torch.nn.Module, projected: Projected) -> tuple[torch.Tensor, float | None]:
        """(SLA's output (B, S, H, D), fraction of block pairs skipped).

        Under Ulysses context parallelism (``sagesla.parallel.enable_ulysses``) the input holds this rank's S / N
        tokens of every head: diffusers' templated attention exchanges them all-to-all so that SLA sees all tokens of
        H / N heads, in their global order (the very selection, quantisation and ``proj_l`` of one GPU), and
        exchanges the output back.
        """
        if ulysses_degree(self._parallel_config) == 1:
            return self._attend(sla, projected)
        sparsity = []

        def forward_op(ctx, q, k, v, *args, **kwargs):
            out, skipped = self._attend(sla, Projected(q, k, v))
            sparsity.append(skipped)
            return out

        def backward_op(ctx, grad_out):
            raise NotImplementedError(
                f"sagesla: {self.layer_name}: SLA under context parallelism serves inference only (no backward)"
            )

        out = _templated_context_parallel_attention(
            projected.query,
            projected.key,
            projected.value,
            forward_op=forward_op,
            backward_op=backward_op,
            _parallel_config=self._parallel_config,
        )
        return out, sparsity[0]

    def _attend(self, sla: torch.nn.Module, projected: Projected) -> tuple[torch.Tensor, float | None]:
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
                dense, lambda: self.dense(projected)[0], lambda: self._sparse_with_sparsity(sla, projected)[0], ()
            ), None
        return self._sparse_with_sparsity(sla, projected)

    def _sparse_with_sparsity(self, sla: torch.nn.Module, projected: Projected) -> tuple[torch.Tensor, float | None]:
        """``sla`` at this call's topk (its bucket's with ``bucket_topk``): (output, fraction of block pairs skipped,
        None where chosen on the device). A profile's bucket at topk 1.0 keeps every key block: it runs the replaced
        processor's attention instead (as a layer at 1.0 in every bucket is left dense by ``patch``)."""
        query, key, value, exact = projected.query, projected.key, projected.value, _exact(projected)
        if self.bucket_topk is None:
            return sla(query, key, value, return_sparsity=True, **exact)

        def at(topk: float) -> tuple[torch.Tensor, float]:
            if topk == 1.0:
                return self.dense(projected)[0], 0.0
            return sla(query, key, value, return_sparsity=True, topk=topk, **exact)

        timestep = self.timesteps.timestep
        if timestep is None:
            if not torch.compiler.is_compiling():
                self._log_once("no timestep seen in this forward: using the largest topk of its buckets")
            return at(max(self.bucket_topk))
        if not torch.compiler.is_compiling():
            return at(self.bucket_topk[self.timesteps.bucket])
        # Compiled: the bucket is data, so the graph holds every bucket's call and picks one on the device.
        index = self.timesteps.bucket_index(timestep)
        return _by_bucket(index, self.bucket_topk, lambda topk: at(topk)[0]), None

    def fall_back(self, reason: str) -> None:
        """Record a dense call and log its reason once per layer and reason."""
        self.last_fallback, self.last_sparsity = reason, 0.0
        self._log_once(f"runs dense attention: {reason}")

    def _log_once(self, message: str) -> None:
        """Log a WARNING naming this layer, once per layer and message."""
        if message not in self._logged:
            self._logged.add(message)
            logger.warning("sagesla: %s %s", self.layer_name, message)


def _exact(projected: Projected) -> dict:
    """SLA's ``exact_kv`` / ``exact_mask`` keywords for a joint call's text keys, {} for a self-attention call."""
    if projected.text is None:
        return {}
    return {"exact_kv": projected.text[1:], "exact_mask": projected.text_mask}
