"""``SageSLAConfig`` + ``apply_sage_sla`` / ``remove_sage_sla``: ``patch`` / ``unpatch`` in the shape of diffusers'
hook configs (``FirstBlockCacheConfig`` + ``apply_first_block_cache``), and ``PRESETS`` for the measured shapes.

``apply_sage_sla(model, config)`` is ``patch(model, **the config's fields)``: same validation (patch's own checks,
run when the config is built), same result, same report.
"""

import dataclasses
import os
import types
from collections.abc import Iterable, Mapping

from sagesla.patching.patch import check_dense_layers, check_patch_arguments, check_settings, patch, unpatch
from sagesla.patching.report import PatchReport
from sagesla.patching.timesteps import check_dense_steps
from sagesla.profile import Profile
from sagesla.settings import SLASettings


@dataclasses.dataclass(frozen=True)
class SageSLAConfig:
    """``sagesla.patch``'s arguments as one frozen object, validated when built.

    Attributes (each as in ``sagesla.patch``):
        topk: fraction of key blocks each query block keeps, in (0, 1], for every layer.
        profile: instead of ``topk``: the path of a calibration profile file (read by ``apply_sage_sla``), a
            ``Profile``, or {layer name: topk} (kept as a read-only copy).
        dense_layers: layer names (str) and / or block indices (int) left dense; kept as a tuple.
        dense_steps: timestep range(s) run dense; kept as patch normalises them, a tuple of (low, high) floats.
        settings: the SLA settings (``quantized``, ``backend``, blocks, precisions, ...); ``SLASettings()`` (patch's
            keyword defaults) when not given or None.
        check_finite: run dense attention for calls whose q, k or v holds NaN/Inf.
    Raises (when built):
        TypeError / ValueError with patch's own messages: not exactly one of ``topk`` / ``profile``, a topk out
        of (0, 1], a ``dense_layers`` / ``dense_steps`` / ``check_finite`` / ``settings`` of the wrong kind.
        What needs the model (which layers ``dense_layers`` names) or the file (the profile's contents) is
        checked by ``apply_sage_sla``.

    Frozen; equal when the fields are equal, and hashable unless ``profile`` is a mapping.
    """

    topk: float | None = None
    profile: str | os.PathLike | Profile | Mapping[str, float] | None = None
    dense_layers: Iterable[str | int] | None = None
    dense_steps: tuple[float, float] | Iterable[tuple[float, float]] | None = None
    settings: SLASettings = SLASettings()
    check_finite: bool = False

    def __post_init__(self) -> None:
        # A path is read at apply time (as patch does); here it only counts as "a profile was given".
        is_path = isinstance(self.profile, (str, os.PathLike))
        check_patch_arguments(self.topk, {} if is_path else self.profile, self.check_finite)
        if isinstance(self.profile, Mapping):
            object.__setattr__(self, "profile", types.MappingProxyType(dict(self.profile)))
        # Which layers the entries name needs the model: apply_sage_sla checks it.
        object.__setattr__(self, "dense_layers", check_dense_layers(self.dense_layers))
        object.__setattr__(self, "dense_steps", check_dense_steps(self.dense_steps) or None)
        if not check_settings(self.settings):
            object.__setattr__(self, "settings", SLASettings())

    @classmethod
    def preset(cls, name: str) -> "SageSLAConfig":
        """The measured config ``PRESETS[name]``; ValueError listing the presets for another name."""
        if name not in PRESETS:
            raise ValueError(f"unknown SageSLA preset {name!r}; the presets are {sorted(PRESETS)}")
        return PRESETS[name]


def apply_sage_sla(module_or_pipeline: object, config: SageSLAConfig) -> PatchReport:
    """``sagesla.patch(module_or_pipeline, ...)`` with ``config``'s fields; returns its ``PatchReport``.

    Example:
        >>> report = apply_sage_sla(pipe, SageSLAConfig(topk=0.05))  # or SageSLAConfig.preset("wan2.1-1.3b-480p")
    """
    if not isinstance(config, SageSLAConfig):
        raise TypeError(f"`config` must be a sagesla.SageSLAConfig, got {type(config).__name__}")
    return patch(
        module_or_pipeline,
        topk=config.topk,
        profile=config.profile,
        dense_layers=config.dense_layers,
        dense_steps=config.dense_steps,
        settings=config.settings,
        check_finite=config.check_finite,
    )


def remove_sage_sla(module_or_pipeline: object) -> list[str]:
    """Undo ``apply_sage_sla`` (``sagesla.unpatch``): the original processors back, the ``sla`` submodules gone.
    Returns the restored layer names."""
    return unpatch(module_or_pipeline)


# Configs measured in benchmarks/ (H100, random weights, bf16; speed only: the accuracy of a topk on trained
# weights is the checkpoint's matter). Wan2.2 A14B has no measurement, so no preset.
PRESETS: Mapping[str, SageSLAConfig] = types.MappingProxyType(
    {
        # benchmarks/results/H100-e2e-wan2.1-1.3b.md: 32760 tokens, topk 0.05 1.99x a step (topk 0.1: 1.89x).
        "wan2.1-1.3b-480p": SageSLAConfig(topk=0.05),
        # benchmarks/results/H100-e2e-wan2.1-14b-ulysses.md (75600 tokens, topk 0.05) and H100-attention.md.
        "wan2.1-14b-720p": SageSLAConfig(topk=0.05),
    }
)
