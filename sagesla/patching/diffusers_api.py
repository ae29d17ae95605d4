"""Every diffusers name and attribute ``sagesla.patch`` relies on, in one place.

The Wan-family attention processors, their ``_get_qkv_projections`` helpers and diffusers' attention dispatch and
context-parallel internals are private API that moves between diffusers releases. ``resolve()`` imports every name
listed here and, when one has moved, raises ImportError listing each one that did, with the installed diffusers
version and the tested range: an upgrade fails loudly at ``sagesla.patch`` instead of patching wrongly.
``tests/test_wan_family.py`` checks the names and the attributes against the installed diffusers.

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

_TRANSFORMERS = "diffusers.models.transformers"

_DISPATCH = "diffusers.models.attention_dispatch"
_PARALLEL = "diffusers.models._modeling_parallel"

# Names every supported release has: {name: (module, attribute)}.
CORE = {
    # The dense attention of every Wan-family processor; the SLA processor's dense fallback and calibration path.
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
    """A Wan-family attention processor (its self-attention path) and how ``sagesla.patch`` treats its layers.

    Attributes:
        module: the module under ``diffusers.models.transformers`` that defines it (its own copy of the Wan code).
        name: its class name there.
        since: the first diffusers release whose module defines it; before it the module may be absent (that
            diffusers has no such model), from it on an absent name has moved.
        qkv: the module's q/k/v projection helper, which the SLA processor calls as the processor does; None where
            SLA cannot serve the processor.
        skipped: why its self-attention layers stay as they are (then ``qkv`` is None).
        models: the diffusers models whose self-attention runs it.
    """

    module: str
    name: str
    since: tuple[int, int]
    qkv: str | None
    skipped: str | None = None
    models: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return f"{_TRANSFORMERS}.{self.module}"


# Each served processor computes, for a self-attention call: ``_get_qkv_projections`` (separate or fused q/k/v),
# ``norm_q`` / ``norm_k`` over all heads, unflatten into (B, S, H, D), Wan's interleaved cos/sin RoPE, attention by
# ``dispatch_attention_fn`` (the layer's mask, the processor's backend and parallel config), flatten, ``type_as``,
# ``to_out[0]``, ``to_out[1]``; image keys (I2V) only in cross-attention. ``SLAWanAttnProcessor`` reproduces that.
PROCESSORS = (
    Processor(
        "transformer_wan",
        "WanAttnProcessor",
        (0, 35),
        "_get_qkv_projections",
        models=("WanTransformer3DModel", "WanVACETransformer3DModel"),
    ),
    Processor(
        "transformer_wan_animate",
        "WanAttnProcessor",
        (0, 36),
        "_get_qkv_projections",
        models=("WanAnimateTransformer3DModel",),
    ),
    Processor(
        "transformer_chronoedit",
        "WanAttnProcessor",
        (0, 36),
        "_get_qkv_projections",
        models=("ChronoEditTransformer3DModel",),
    ),
    Processor(
        "transformer_skyreels_v2",
        "SkyReelsV2AttnProcessor",
        (0, 36),
        "_get_qkv_projections",
        models=("SkyReelsV2Transformer3DModel",),
    ),
    Processor(
        "transformer_wan_animate_2",
        "WanAnimate2AttnProcessor",
        (0, 40),
        None,
        skipped=(
            "WanAnimate2AttnProcessor attends through a flex BlockMask in its generation pass (each frame also sees "
            "the cached reference keys of its frame); SLA has no masks, so the layer stays dense"
        ),
        models=("WanAnimate2Transformer3DModel",),
    ),
)

# Every attention layer of Wan's shape has these; sagesla reads them (``heads``, ``to_q.out_features`` for the head
# dim, ``is_cross_attention``, ``processor``) or the processors above do (``to_k``, ``to_v``, ``to_out``, norms).
LAYER_ATTRIBUTES = ("heads", "to_q", "to_k", "to_v", "to_out", "norm_q", "norm_k", "is_cross_attention", "processor")
# Read where present: the image keys of I2V cross-attention (None or absent in self-attention), and the class's
# default processor, which marks a layer of a Wan-family model even under a processor set by someone else.
OPTIONAL_LAYER_ATTRIBUTES = ("add_k_proj", "_default_processor_cls")
# Set on every processor by ``set_attention_backend`` / ``enable_parallelism``; the SLA processor forwards them.
PROCESSOR_ATTRIBUTES = ("_attention_backend", "_parallel_config")
# Of the transformer: ``patch`` / ``unpatch`` install processors through them.
MODEL_ATTRIBUTES = ("attn_processors", "set_attn_processor")
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
        served: {processor class: its module's ``_get_qkv_projections``} for the processors SLA serves.
        skipped: {processor class: why its self-attention layers stay as they are}.
    """

    core: dict[str, object]
    served: dict[type, Callable]
    skipped: dict[type, str]


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
    """(the object or None, what moved or None). An absent module of a release before ``since`` is no problem."""
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as error:
        if since is not None and error.name == module and version is not None and version < since:
            return None, None
        return None, f"{module} (cannot import it: {error})"
    if not hasattr(found, attribute):
        return None, f"{module}.{attribute}"
    return getattr(found, attribute), None


def resolve() -> Resolved:
    """Import every name of ``CORE`` and ``PROCESSORS`` from the installed diffusers.

    Raises:
        ImportError: a name moved (or its module does not import); the message lists every one, with the
            installed diffusers version and ``TESTED_DIFFUSERS``.
    """
    version = installed_version()
    moved, core, served, skipped = [], {}, {}, {}
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
        if entry.qkv is None:
            skipped[processor] = entry.skipped
        elif helper is not None:
            served[processor] = helper
    if moved:
        shown = "unknown" if version is None else ".".join(map(str, version))
        raise ImportError(
            f"sagesla.patch relies on diffusers internals that diffusers {shown} does not have where expected "
            f"(sagesla is tested with diffusers{TESTED_DIFFUSERS}; see sagesla/patching/diffusers_api.py): "
            + "; ".join(moved)
        )
    return Resolved(core=core, served=served, skipped=skipped)
