"""``patch`` / ``unpatch``: SLA in place of the self-attention of diffusers video transformers and pipelines."""

import importlib.util
import inspect
import os
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from sagesla import validation
from sagesla.modules import SageSparseLinearAttention, SparseLinearAttention, sla_module
from sagesla.patching.checkpoints import SLA_ATTRIBUTE
from sagesla.patching.report import DENSE_LAYERS, PROFILE_DENSE, PatchReport
from sagesla.patching.timesteps import TimestepTracker, check_dense_steps
from sagesla.profile import CHECKED_SETTINGS, LayerSpec, Profile, ProfileError, load_profile
from sagesla.settings import SLASettings

# Pipeline attributes holding transformers (Wan2.2 A14B has a high-noise and a low-noise expert).
PIPELINE_COMPONENTS = ("transformer", "transformer_2")


def _families():
    """``sagesla.patching.families``, which imports diffusers (an optional dependency)."""
    if importlib.util.find_spec("diffusers") is None:
        raise ImportError("sagesla.patch needs diffusers: pip install 'sagesla[diffusers]'")
    from sagesla.patching import families

    return families


def components(model_or_pipeline: object) -> list[tuple[str, nn.Module]]:
    """(name prefix, model): ("", model) for a model, ("transformer.", ...) for each transformer of a pipeline."""
    if isinstance(model_or_pipeline, nn.Module):
        return [("", model_or_pipeline)]
    found: list[tuple[str, nn.Module]] = []
    for attr in PIPELINE_COMPONENTS:
        model = getattr(model_or_pipeline, attr, None)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"`model_or_pipeline.{attr}` must be a torch.nn.Module, got {type(model).__name__}")
        # One model under two names is patched once.
        if model is not None and all(model is not seen for _, seen in found):
            found.append((f"{attr}.", model))
    if not found:
        raise TypeError(
            "`model_or_pipeline` must be a diffusers video transformer (e.g. WanTransformer3DModel) or a pipeline with "
            f"`transformer` / `transformer_2`, got {type(model_or_pipeline).__name__}"
        )
    return found


def _set_processors(model: nn.Module, processors: dict[str, object]) -> None:
    """Install processors by layer name: the layer's ``set_processor`` (what diffusers' ``set_attn_processor`` calls),
    or its ``processor`` attribute where it has none (Mochi's attention)."""
    for name, processor in processors.items():
        layer = model.get_submodule(name)
        if hasattr(layer, "set_processor"):
            layer.set_processor(processor)
        else:
            layer.processor = processor


def check_patch_arguments(topk, profile, check_finite) -> None:
    """Exactly one of ``topk`` (in (0, 1]) and ``profile`` (a mapping or ``Profile``), and a bool ``check_finite``."""
    if (topk is None) == (profile is None):
        given = "both" if topk is not None else "neither"
        raise ValueError(
            "give exactly one of `topk` (one fraction for every layer) or `profile` ({layer name: topk}), "
            f"got {given}"
        )
    if topk is not None:
        validation.check_topk(topk)
    elif not isinstance(profile, (Mapping, Profile)):
        raise TypeError(
            f"`profile` must be a mapping {{layer name: topk}}, got {type(profile).__name__}; or a "
            "sagesla.calibration Profile, or the path of a profile file"
        )
    validation.check_bool("check_finite", check_finite)


def check_settings(settings: object) -> bool:
    """Raise ``TypeError`` unless ``settings`` is an ``SLASettings`` or None; True if it is one."""
    if settings is not None and not isinstance(settings, SLASettings):
        raise TypeError(f"`settings` must be a sagesla.SLASettings or None, got {type(settings).__name__}")
    return settings is not None


def _topk_per_layer(
    names: list[str], topk: float | None, profile: Mapping | None, dense: frozenset[str] = frozenset()
) -> dict[str, float]:
    """{layer name: topk} for every self-attention layer but the ``dense`` ones, from the global ``topk`` or the
    ``profile`` (which may name the dense layers too)."""
    if profile is None:
        return {name: float(topk) for name in names if name not in dense}
    missing = [name for name in names if name not in profile and name not in dense]
    unknown = [key for key in profile if key not in names]
    if missing or unknown:
        raise ValueError(
            f"`profile` must give a topk for every self-attention layer and nothing else: missing {missing}, "
            f"unknown {unknown} (layers: {names})"
        )
    return {
        name: validation.check_topk(profile[name], name=f"profile[{name!r}]") for name in names if name not in dense
    }


def _block_index(name: str) -> int | None:
    """i for a layer inside ``blocks[i]`` (its name holds the components ``blocks``, ``i``), else None."""
    found = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    return None if found is None else int(found[1])


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for index in sorted(set(indices)):
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def check_dense_layers(dense_layers: object) -> tuple[str | int, ...] | None:
    """``dense_layers`` as a tuple of layer names (str) and block indices (int), or None; ``TypeError`` naming the
    argument or every entry of another kind."""
    if dense_layers is None:
        return None
    if isinstance(dense_layers, (str, bytes, Mapping)) or not isinstance(dense_layers, Iterable):
        raise TypeError(
            "`dense_layers` must be a list of layer names (str, e.g. 'blocks.0.attn1') and / or block indices (int), "
            f"got {type(dense_layers).__name__} {dense_layers!r:.80}"
        )
    entries = tuple(dense_layers)
    wrong = [entry for entry in entries if not (isinstance(entry, str) or validation.is_number(entry, int))]
    if wrong:
        raise TypeError(
            f"`dense_layers` entries must be layer names (str) or block indices (int), got {wrong!r:.200} "
            f"({', '.join(sorted({type(entry).__name__ for entry in wrong}))})"
        )
    return entries


def _dense_layers(entries: tuple[str | int, ...] | None, layers: list[LayerSpec], skipped: Mapping[str, str]):
    """The self-attention layer names that checked ``dense_layers`` entries select (a frozenset): each str a layer
    name (as the report names it), each int i every self-attention layer inside ``blocks[i]`` (of each transformer
    of a pipeline).

    Raises ValueError naming every entry that names no self-attention layer SLA serves (listing them), or a layer
    patched already.
    """
    if entries is None:
        return frozenset()
    names = [layer.name for layer in layers]
    blocks: dict[int, list[str]] = {}
    for name in names:
        if (index := _block_index(name)) is not None:
            blocks.setdefault(index, []).append(name)
    chosen, unknown = set(), []
    for entry in entries:
        found = [entry] if entry in names else [] if isinstance(entry, str) else blocks.get(entry, [])
        chosen.update(found)
        if not found:
            unknown.append(entry)
    if unknown:
        raise ValueError(
            f"`dense_layers` names no self-attention layer SLA serves: {unknown}; the layers are {names} and the "
            f"block indices {_ranges(list(blocks)) or 'none'}"
        )
    patched = [name for name in names if name in chosen and name in skipped]
    if patched:
        raise ValueError(
            f"`dense_layers` names layer(s) patched already, which run SLA: {patched} (sagesla.unpatch first)"
        )
    return frozenset(chosen)


def _survey(components: list[tuple[str, nn.Module]], families) -> tuple[list, list[LayerSpec], dict[str, str]]:
    """(layers to patch as (prefix, model, name, module), every self-attention layer SLA serves, {skipped: reason}).

    Layers are chosen by what they compute (their family's ``layer_reason``, ``families.unserved_reason``), not by
    class.
    """
    targets, self_attention, skipped = [], [], {}
    for prefix, model in components:
        layers = [(name, module) for name, module in model.named_modules() if hasattr(module, "processor")]
        known = [families.family_of(module) for _, module in layers]
        if not any(known):
            where = f"`model_or_pipeline.{prefix[:-1]}`" if prefix else "`model_or_pipeline`"
            raise TypeError(
                f"{where} must be a diffusers video transformer whose attention SLA serves ({families.MODELS}), got "
                f"{type(model).__name__}"
            )
        # A layer of a processor no family knows (e.g. Wan-Animate's face adapter) is judged as its model's.
        model_family = next(family for family in known if family)
        for (name, module), family in zip(layers, known, strict=True):
            if (reason := families.SLA_PROCESSORS[family or model_family].layer_reason(name, module)) is not None:
                skipped[prefix + name] = reason
            elif isinstance(module.processor, families.SLAProcessor):
                self_attention.append(families.layer_spec(prefix + name, module))
                skipped[prefix + name] = "already patched (sagesla.unpatch first to change its settings)"
            elif (reason := families.unserved_reason(module)) is not None:
                skipped[prefix + name] = reason
            else:
                self_attention.append(families.layer_spec(prefix + name, module))
                targets.append((prefix, model, name, module))
    return targets, self_attention, skipped


def _fit_profile(
    profile: Profile, model_class: str, layers: list[LayerSpec], settings: SLASettings, dense: frozenset[str]
) -> tuple[list, dict, frozenset[str]]:
    """Check ``profile`` against the model and patch settings; returns (report notes, {layer: topk per bucket},
    the layers it keeps at topk 1.0 in every bucket that ``dense`` does not name: they run dense too).

    The blocks are checked where ``settings`` gives them (None takes the profile's). A layer in ``dense`` need not
    be in the profile (one calibrated with it dense has no entry for it); where it is, it must fit.
    """
    checked = {name: getattr(settings, name) for name in CHECKED_SETTINGS}
    named = {layer.name for layer in profile.layers}
    layers = [layer for layer in layers if layer.name not in dense or layer.name in named]
    profile.check_fits(model_class, layers, {name: value for name, value in checked.items() if value is not None})
    selection, attention = profile.selection, profile.measurements.attention
    profile_dense = frozenset(profile.dense_layers()) - dense
    # A setting of a layer that runs dense runs no candidate.
    running = torch.tensor([layer.name not in dense | profile_dense for layer in profile.layers])
    short = int((~profile.met & running[:, None]).sum())
    notes = [
        f"profile: {selection.metric} budget {selection.budget:g}{' per head' if selection.per_head else ''}, "
        f"blocks {attention.block_q}x{attention.block_k}"
        + (f"; {short} setting(s) met it at no candidate and run the largest" if short else "")
    ]
    if selection.per_head:
        notes.append(
            "per-head topk is applied per layer: the smallest topk that met the budget in every head "
            "(the kernels take one topk per call)"
        )
    if profile.bucket_edges:
        notes.append(
            f"topk follows the timestep bucket (edges {list(profile.bucket_edges)}); listed: each layer's largest"
        )
    return notes, profile.layer_topk(), profile_dense


def patch(
    model_or_pipeline: object,
    *,
    topk: float | None = None,
    profile: Mapping[str, float] | Profile | str | os.PathLike | None = None,
    dense_layers: Iterable[str | int] | None = None,
    dense_steps: tuple[float, float] | Iterable[tuple[float, float]] | None = None,
    quantized: bool = True,
    backend: str = "auto",
    linear_scope: str = "all",
    feature_map: str = "softmax",
    block_q: int | None = None,
    block_k: int | None = None,
    pv_precision: str = "auto",
    compute_dtype: torch.dtype = torch.bfloat16,
    settings: SLASettings | None = None,
    check_finite: bool = False,
) -> PatchReport:
    """Replace the self-attention of a diffusers video transformer, or of each transformer of a pipeline, by SLA.

    In place. Every attention layer SLA serves (the self-attention of Wan, VACE, Animate, ChronoEdit, SkyReels-V2,
    LTX-Video and LTX-2; the joint text+video attention of HunyuanVideo 1 / 1.5, CogVideoX and Mochi: see
    docs/patching.md and ``diffusers_api.PROCESSORS``) gets an SLA module as its submodule ``sla`` (state-dict keys
    ``blocks.{i}.attn1.sla.proj_l.weight`` [D, D] and ``.bias`` [D], fp32, zero: load trained ones with
    ``sagesla.load_sla_weights``) and the SLA processor of its family (``SLAWanAttnProcessor``, ...), which keeps
    diffusers' projections, QK-norm and RoPE and runs SLA for the attention; in a joint layer the video queries
    attend their selected video blocks plus every attended text token, the text queries attend densely.
    Cross-attention stays as it is, and so does a layer whose processor computes what SLA cannot (Wan-Animate-2's
    masked generation pass), reported in ``skipped``. A call SLA cannot serve (an attention mask, a sequence
    shorter than one block, a dtype or head_dim the backend cannot serve, ...) runs diffusers' dense attention
    instead and logs the reason once per layer on the "sagesla" logger.

    Args:
        model_or_pipeline: a diffusers video transformer of a served family (``WanTransformer3DModel``,
            ``LTXVideoTransformer3DModel``, ``HunyuanVideoTransformer3DModel``, ``CogVideoXTransformer3DModel``,
            ``MochiTransformer3DModel``, ...), or a pipeline whose ``transformer`` / ``transformer_2`` are
            (both are patched; Wan2.2 A14B has two).
        topk: fraction of key blocks each query block keeps, in (0, 1], for every layer.
        profile: instead of ``topk``, {layer name: topk} naming every self-attention layer, e.g.
            ``{"blocks.0.attn1": 0.05, ...}`` (``"transformer.blocks.0.attn1"`` ... for a pipeline); or a
            calibration ``Profile`` or the path of its file, checked against the model (layers, heads, head_dim)
            and the SLA settings (quantized, linear_scope, feature_map, blocks; blocks default to the profile's).
            With timestep buckets, each forward's timestep picks the topk (a pre-hook on each transformer).
            ``dense_layers`` and ``dense_steps`` win over it; it need not name the ``dense_layers``. A layer a
            ``Profile`` keeps at topk 1.0 in every bucket (``Profile.dense_layers()``) runs diffusers' own
            attention, as a ``dense_layers`` one does (SLA keeping every key block is slower and, quantized, less
            exact), reported in ``skipped`` with the reason ``report.PROFILE_DENSE``; a layer at 1.0 in some
            buckets only is patched and runs diffusers' attention in those buckets. A mapping is applied as given:
            its 1.0 entries run SLA at topk 1.0 (what was asked for explicitly).
        dense_layers: self-attention layers left exactly as they are (diffusers' own attention): layer names as
            the report names them (``"blocks.0.attn1"``; ``"transformer.blocks.0.attn1"`` for a pipeline), and / or
            block indices: an int i stands for every self-attention layer inside ``blocks[i]`` (in each
            transformer of a pipeline; ``vace_blocks`` are named by str). Not patched, and reported in ``skipped``
            with the reason "dense_layers".
        dense_steps: timesteps whose forwards run diffusers' own attention in every patched layer, bit for bit the
            unpatched model: a range ``(low, high)`` in the scheduler's timestep units (a forward with timestep t
            is dense where ``low <= t <= high``; for Wan2.2 TI2V's per-token timesteps, t is the largest), or a
            list of ranges. ``sagesla.patching.dense_timesteps(scheduler.timesteps, first=N, last=M)`` gives the
            ranges of the first / last steps. A pre-hook on each transformer records the timestep (per thread); a
            call outside such a forward runs SLA.
        quantized: ``SageSparseLinearAttention`` (INT8 Q/K, FP8 P/V) when True, ``SparseLinearAttention`` if not.
        backend: "auto" (Triton on CUDA where it serves the call, dense attention where it does not; the torch
            reference on CPU), "torch" (the reference everywhere) or "triton" (dense where it cannot serve a call).
        linear_scope, feature_map: as in ``sparse_linear_attn``; the defaults match TurboDiffusion's checkpoints.
        block_q, block_k: BQ, BK; default as in ``sparse_linear_attn``.
        pv_precision, compute_dtype: as in ``sparse_linear_attn`` (compute in bf16 by default, as the modules do).
        settings: instead of the keywords from ``quantized`` to ``compute_dtype``, an ``SLASettings`` holding them
            (its ``tensor_layout`` is ignored: the processor hands SLA [B, L, H, D] views).
        check_finite: run dense attention for calls whose q, k or v holds NaN/Inf (one device sync per call).
            Without it such a call gives NaN where dense attention would be non-finite, and possibly in more rows.
    Returns:
        a ``PatchReport``: the replaced layers with their topk, the skipped ones with reasons (``dense_layers`` and
        the profile's dense layers among them), the ``dense_steps`` ranges.
    Raises:
        TypeError / ValueError: invalid arguments (``TypeError`` also for a model with no attention layer of a
            served processor family); ``ValueError`` also for a profile that misses or adds layers.
        ProfileError: a profile file that cannot be read, or a profile that does not fit (lists every mismatch).
        ImportError: diffusers is not installed, or a diffusers internal the patcher relies on moved (the message
            lists each; ``sagesla.patching.diffusers_api``).
    Example:
        >>> report = sagesla.patch(pipe, topk=0.1)  # pipe = diffusers.WanPipeline.from_pretrained(...)
        >>> print(report)
    """
    if isinstance(profile, (str, os.PathLike)):
        source, profile = os.fspath(profile), load_profile(profile)
    else:
        source = None
    check_patch_arguments(topk, profile, check_finite)
    dense_ranges = check_dense_steps(dense_steps)
    dense_layers = check_dense_layers(dense_layers)
    keywords = {
        "quantized": quantized,
        "feature_map": feature_map,
        "linear_scope": linear_scope,
        "block_q": block_q,
        "block_k": block_k,
        "compute_dtype": compute_dtype,
        "pv_precision": pv_precision,
        "backend": backend,
    }
    if settings is None:
        settings = SLASettings(**keywords, tensor_layout="NHD")
    elif check_settings(settings) and (changed := [name for name, v in keywords.items() if v != _DEFAULTS[name]]):
        raise ValueError(f"give `settings` or the keywords it holds, not both: got `settings` and {changed}")
    else:
        settings = settings.replace(tensor_layout="NHD", compute_dtype=settings.compute_dtype or torch.bfloat16)
    parts = components(model_or_pipeline)
    families = _families()
    targets, self_attention, skipped = _survey(parts, families)
    dense = _dense_layers(dense_layers, self_attention, skipped)
    notes, bucket_topk, edges, profile_dense = [], {}, (), frozenset()
    if isinstance(profile, Profile):
        try:
            notes, by_layer, profile_dense = _fit_profile(
                profile, type(model_or_pipeline).__name__, self_attention, settings, dense
            )
        except ProfileError as error:
            raise (ProfileError(f"{source!r}: {error}") if source else error) from None
        recorded = profile.measurements.attention
        settings = settings.replace(block_q=recorded.block_q, block_k=recorded.block_k)
        if profile.bucket_edges:
            edges, bucket_topk = profile.bucket_edges, by_layer
        profile = {name: max(values) for name, values in by_layer.items()}
    # The user's dense_layers keep their reason where the profile's name them too.
    dense_reasons = {**dict.fromkeys(profile_dense, PROFILE_DENSE), **dict.fromkeys(dense, DENSE_LAYERS)}
    topks = _topk_per_layer([layer.name for layer in self_attention], topk, profile, frozenset(dense_reasons))
    # One tracker (one pre-hook per transformer) serves the profile's buckets and dense_steps.
    timesteps = TimestepTracker(edges, dense_ranges) if edges or dense_ranges else None
    for prefix, _, name, _ in targets:
        if prefix + name in dense_reasons:
            skipped[prefix + name] = dense_reasons[prefix + name]
    targets = [target for target in targets if target[0] + target[2] not in dense_reasons]

    # Build everything first, so a failure leaves the model untouched.
    replaced = {prefix + name: topks[prefix + name] for prefix, _, name, _ in targets}
    installs = []
    for prefix, model, name, module in targets:
        sla = sla_module(families.head_dim(module), replaced[prefix + name], settings)
        sla = sla.to(next(module.parameters()).device)
        processor = families.sla_processor(module.processor)(
            module.processor, prefix + name, check_finite, bucket_topk.get(prefix + name), timesteps
        )
        installs.append((model, name, module, sla, processor))
    for _, model in parts:
        chosen = {}
        for owner, name, module, sla, processor in installs:
            if owner is model:
                setattr(module, SLA_ATTRIBUTE, sla)
                chosen[name] = processor
        if chosen:
            _set_processors(model, chosen)
            if timesteps is not None:
                timesteps.attach(model)
    attention = SageSparseLinearAttention if settings.quantized else SparseLinearAttention
    return PatchReport(
        attention=attention.__name__,
        backend=settings.backend,
        replaced=replaced,
        skipped=skipped,
        notes=tuple(notes),
        dense_steps=dense_ranges,
    )


# patch's keyword defaults (``settings`` replaces the SLA ones, which must then stay at them).
_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(patch).parameters.items()}


def unpatch(model_or_pipeline: object) -> list[str]:
    """Undo ``patch`` in place: restore each layer's original processor and delete its ``sla`` submodule.

    Afterwards the model computes exactly what it computed before ``patch``. Returns the restored layer names.
    """
    families = _families()
    restored = []
    for prefix, model in components(model_or_pipeline):
        originals = {}
        for name, module in model.named_modules():
            if isinstance(getattr(module, "processor", None), families.SLAProcessor):
                if module.processor.timesteps is not None:
                    module.processor.timesteps.detach()
                originals[name] = module.processor.original
                delattr(module, SLA_ATTRIBUTE)
                restored.append(prefix + name)
        if originals:
            _set_processors(model, originals)
    return restored
