"""Every diffusers name and attribute ``sagesla.patch`` relies on, in one place.

The attention processors SLA reproduces (by family), the Wan family's ``_get_qkv_projections`` helpers and
diffusers' attention dispatch and context-parallel internals are private API that moves between diffusers
releases. ``resolve()`` imports every name listed here and, when one has moved, raises ImportError listing each one
that did, with the installed diffusers version and the tested range: an upgrade fails loudly at ``sagesla.patch``
instead of patching wrongly. ``tests/test_wan_family.py`` and ``tests/test_model_families.py`` check the names and
the attributes against the installed diffusers.

Importing this module does not import diffusers; ``resolve()`` does.
"""

import importlib
import importlib.metadata
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

# The diffusers releases the patcher is tested with, [TESTED_FROM, TESTED_BELOW); pyproject.toml's `diffusers` and
# `dev` extras state the same. 0.36 is the first with every name below (0.35 lacks the context-parallel internals),
# but its VACE cross-attention (``vace_blocks.{i}.attn2``) does not say it is one (``is_cross_attention`` False):
# 0.37 is the first whose every layer tells what it computes.
TESTED_FROM = (0, 37)
TESTED_BELOW = (0, 43)
TESTED_DIFFUSERS = f">={TESTED_FROM[0]}.{TESTED_FROM[1]},<{TESTED_BELOW[0]}.{TESTED_BELOW[1]}"

_DISPATCH = "diffusers.models.attention_dispatch"
_PARALLEL = "diffusers.models._modeling_parallel"

# Names every supported release has: {name: (module, attribute)}.
CORE = {
    # The dense attention of the processors that dispatch (Wan, LTX, HunyuanVideo), hence of their SLA processors.
    "dispatch_attention_fn": (_DISPATCH, "dispatch_attention_fn"),
    # Ulysses all-to-all around SLA under context parallelism.
    "_templated_context_parallel_attention": (_DISPATCH, "_templated_context_parallel_attention"),
    # Whose attributes PARALLEL_CONFIG_ATTRIBUTES lists (the processor's ``_parallel_config``); ContextParallelConfig
    # also builds sagesla.parallel's Ulysses setup.
    "ParallelConfig": (_PARALLEL, "ParallelConfig"),
    "ContextParallelConfig": (_PARALLEL, "ContextParallelConfig"),
}


@dataclass(frozen=True)
class Processor:
    """A diffusers attention processor and how ``sagesla.patch`` treats its layers.

    Attributes:
        module: the module under ``diffusers.models`` that defines it (``transformers.transformer_wan``, ...).
        name: its class name there.
        since: the first diffusers release whose module defines it; before it the module may be absent (that
            diffusers has no such model), from it on an absent name has moved.
        family: the SLA processor family that reproduces it ("wan", "ltx", ...: ``family`` of the SLA processor
            classes).
        qkv: the module's q/k/v projection helper, which the SLA processor calls as the processor does (the Wan
            family's ``_get_qkv_projections``), or None.
        skipped: why its self-attention layers stay as they are (SLA cannot reproduce it), or None.
        models: the diffusers models whose attention runs it.
    """

    module: str
    name: str
    since: tuple[int, int]
    family: str
    qkv: str | None = None
    skipped: str | None = None
    models: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return f"diffusers.models.{self.module}"


# Each served processor computes, for a self-attention call: ``_get_qkv_projections`` (separate or fused q/k/v),
# ``norm_q`` / ``norm_k`` over all heads, unflatten into (B, S, H, D), Wan's interleaved cos/sin RoPE, attention by
# ``dispatch_attention_fn`` (the layer's mask, the processor's backend and parallel config), flatten, ``type_as``,
# ``to_out[0]``, ``to_out[1]``; image keys (I2V) only in cross-attention. ``SLAWanAttnProcessor`` reproduces that.
PROCESSORS = (
    Processor(
        "transformers.transformer_wan",
        "WanAttnProcessor",
        (0, 35),
        "wan",
        "_get_qkv_projections",
        models=("WanTransformer3DModel", "WanVACETransformer3DModel"),
    ),
    Processor(
        "transformers.transformer_wan_animate",
        "WanAttnProcessor",
        (0, 36),
        "wan",
        "_get_qkv_projections",
        models=("WanAnimateTransformer3DModel",),
    ),
    Processor(
        "transformers.transformer_chronoedit",
        "WanAttnProcessor",
        (0, 36),
        "wan",
        "_get_qkv_projections",
        models=("ChronoEditTransformer3DModel",),
    ),
    Processor(
        "transformers.transformer_skyreels_v2",
        "SkyReelsV2AttnProcessor",
        (0, 36),
        "wan",
        "_get_qkv_projections",
        models=("SkyReelsV2Transformer3DModel",),
    ),
    Processor(
        "transformers.transformer_wan_animate_2",
        "WanAnimate2AttnProcessor",
        (0, 40),
        "wan",
        skipped=(
            "WanAnimate2AttnProcessor attends through a flex BlockMask in its generation pass (each frame also sees "
            "the cached reference keys of its frame); SLA has no masks, so the layer stays dense"
        ),
        models=("WanAnimate2Transformer3DModel",),
    ),
    # LTX-Video and LTX-2: norm_q / norm_k over all heads, then RoPE, then unflatten; SLA serves the video
    # self-attention (``attn1``).
    Processor(
        "transformers.transformer_ltx", "LTXVideoAttnProcessor", (0, 35), "ltx", models=("LTXVideoTransformer3DModel",)
    ),
    Processor(
        "transformers.transformer_ltx2",
        "LTX2AudioVideoAttnProcessor",
        (0, 37),
        "ltx2",
        models=("LTX2VideoTransformer3DModel",),
    ),
    # perturbed_attn=True (LTX-2.3, LTX-2.5): the same steps, and spatio-temporal guidance's blend of the values with
    # the attention output.
    Processor(
        "transformers.transformer_ltx2",
        "LTX2PerturbedAttnProcessor",
        (0, 38),
        "ltx2_perturbed",
        models=("LTX2VideoTransformer3DModel",),
    ),
    # Joint text+video attention: one softmax over [video; text] tokens.
    Processor(
        "transformers.transformer_hunyuan_video",
        "HunyuanVideoAttnProcessor2_0",
        (0, 32),
        "hunyuan_video",
        models=("HunyuanVideoTransformer3DModel", "HunyuanVideoFramepackTransformer3DModel"),
    ),
    Processor(
        "transformers.transformer_hunyuan_video15",
        "HunyuanVideo15AttnProcessor2_0",
        (0, 36),
        "hunyuan_video15",
        models=("HunyuanVideo15Transformer3DModel",),
    ),
    Processor(
        "attention_processor",
        "CogVideoXAttnProcessor2_0",
        (0, 30),
        "cogvideox",
        models=("CogVideoXTransformer3DModel", "ConsisIDTransformer3DModel", "CogView3PlusTransformer2DModel"),
    ),
    Processor(
        "attention_processor",
        "FusedCogVideoXAttnProcessor2_0",
        (0, 30),
        "cogvideox",
        skipped=(
            "FusedCogVideoXAttnProcessor2_0 projects through the fused to_qkv (fuse_qkv_projections), which SLA does "
            "not reproduce; unfuse_qkv_projections() brings back CogVideoXAttnProcessor2_0, which it does"
        ),
        models=("CogVideoXTransformer3DModel",),
    ),
    Processor("attention_processor", "MochiAttnProcessor2_0", (0, 31), "mochi", models=("MochiTransformer3DModel",)),
)

# {family: the attributes every attention layer it serves has}: sagesla reads them (``heads``, ``to_q.out_features``
# for the head dim, ``is_cross_attention``, ``processor``) or the processors above do (``to_k``, ``to_v``,
# ``to_out``, norms).
_PROJECTIONS = ("heads", "to_q", "to_k", "to_v", "to_out", "norm_q", "norm_k", "processor")
_ADDED_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
LAYER_ATTRIBUTES = {
    "wan": (*_PROJECTIONS, "is_cross_attention"),
    "ltx": (*_PROJECTIONS, "prepare_attention_mask"),
    "ltx2": (*_PROJECTIONS, "prepare_attention_mask", "to_gate_logits", "rope_type"),
    "ltx2_perturbed": (*_PROJECTIONS, "prepare_attention_mask", "to_gate_logits", "rope_type"),
    "hunyuan_video": (*_PROJECTIONS, *_ADDED_PROJECTIONS),
    "hunyuan_video15": (*_PROJECTIONS, *_ADDED_PROJECTIONS),
    "cogvideox": (*_PROJECTIONS, "is_cross_attention", "prepare_attention_mask"),
    "mochi": (*_PROJECTIONS, *_ADDED_PROJECTIONS),
}
# Read where present: the image keys of I2V cross-attention (None or absent in self-attention), and the class's
# default processor, which marks a layer of a served model even under a processor set by someone else.
OPTIONAL_LAYER_ATTRIBUTES = ("add_k_proj", "_default_processor_cls")
# {family: what its processors have}: ``set_attention_backend`` / ``enable_parallelism`` set these on every
# processor, and the SLA processor forwards them. CogVideoX's and Mochi's processors call torch's SDPA, not
# ``dispatch_attention_fn``, and get them only once set.
_DISPATCHED = ("_attention_backend", "_parallel_config")
PROCESSOR_ATTRIBUTES = {family: () if family in ("cogvideox", "mochi") else _DISPATCHED for family in LAYER_ATTRIBUTES}
# Of the processor's ``_parallel_config`` (a ParallelConfig) and its ``context_parallel_config``.
PARALLEL_CONFIG_ATTRIBUTES = {
    "ParallelConfig": ("context_parallel_config",),
    "ContextParallelConfig": ("ulysses_degree", "ring_degree"),
}


@dataclass(frozen=True)
class Resolved:
    """The objects ``CORE`` and ``PROCESSORS`` name, imported from the installed diffusers.

    Attributes:
        core: {CORE key: object}.
        served: {processor class: its ``PROCESSORS`` entry} for the processors SLA serves.
        qkv: {processor class: its module's q/k/v projection helper} where the entry names one.
        skipped: {processor class: its ``PROCESSORS`` entry} for the processors SLA cannot reproduce (``skipped``
            says why).
    """

    core: dict[str, object]
    served: dict[type, Processor]
    qkv: dict[type, Callable]
    skipped: dict[type, Processor]


def installed_version() -> tuple[int, int] | None:
    """(major, minor) of the installed diffusers, None if it cannot be read."""
    try:
        found = re.match(r"(\d+)\.(\d+)", importlib.metadata.version("diffusers"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return (int(found[1]), int(found[2])) if found else None


def is_tested(version: tuple[int, int] | None) -> bool:
    """Whether a diffusers (major, minor) lies in the tested range."""
    return version is not None and TESTED_FROM <= version < TESTED_BELOW


def warn_if_untested() -> None:
    """Log a WARNING on the "sagesla" logger when the installed diffusers lies outside the tested range."""
    version = installed_version()
    if not is_tested(version):
        shown = "unknown" if version is None else ".".join(map(str, version))
        logging.getLogger("sagesla").warning(
            "sagesla: diffusers %s is outside the releases sagesla.patch is tested with (diffusers%s): the names it "
            "relies on are there, but check a patched model at topk=1.0 against the unpatched one",
            shown,
            TESTED_DIFFUSERS,
        )


def names() -> list[tuple[str, str, tuple[int, int] | None]]:
    """(module, attribute, since) of every name this file lists; since is None for the CORE names."""
    listed = [(module, attribute, None) for module, attribute in CORE.values()]
    for entry in PROCESSORS:
        listed.append((entry.path, entry.name, entry.since))
        if entry.qkv is not None:
            listed.append((entry.path, entry.qkv, entry.since))
    return listed


def _lookup(module: str, attribute: str, since: tuple[int, int] | None, version) -> tuple[object, str | None]:
    """(the object or None, what moved or None). An absent module or name of a release before ``since`` is no
    problem (e.g. ``transformer_ltx2`` of 0.37 has no ``LTX2PerturbedAttnProcessor`` yet)."""
    early = since is not None and version is not None and version < since
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as error:
        if early and error.name == module:
            return None, None
        return None, f"{module} (cannot import it: {error})"
    if not hasattr(found, attribute):
        return None, None if early else f"{module}.{attribute}"
    return getattr(found, attribute), None


def resolve() -> Resolved:
    """Import every name of ``CORE`` and ``PROCESSORS`` from the installed diffusers.

    Raises:
        ImportError: a name moved (or its module does not import); the message lists every one, with the
            installed diffusers version and ``TESTED_DIFFUSERS``.
    """
    version = installed_version()
    moved, core, served, qkv, skipped = [], {}, {}, {}, {}
    for key, (module, attribute) in CORE.items():
        core[key], problem = _lookup(module, attribute, None, version)
        moved += [problem] if problem else []
    for entry in PROCESSORS:
        processor, problem = _lookup(entry.path, entry.name, entry.since, version)
        helper, helper_problem = (
            (None, None) if entry.qkv is None else _lookup(entry.path, entry.qkv, entry.since, version)
        )
        moved += [item for item in dict.fromkeys((problem, helper_problem)) if item]
        if processor is None:
            continue
        if entry.skipped is not None:
            skipped[processor] = entry
        else:
            served[processor] = entry
            if helper is not None:
                qkv[processor] = helper
    if moved:
        shown = "unknown" if version is None else ".".join(map(str, version))
        raise ImportError(
            f"sagesla.patch relies on diffusers internals that diffusers {shown} does not have where expected "
            f"(sagesla is tested with diffusers{TESTED_DIFFUSERS}; see sagesla/patching/diffusers_api.py): "
            + "; ".join(moved)
        )
    return Resolved(core=core, served=served, qkv=qkv, skipped=skipped)
