"""Patching trained models: SLA in place of the self-attention of diffusers video transformers, and SLA checkpoints.

``dense_timesteps`` gives the timestep ranges of a sampler's first / last steps for ``patch(..., dense_steps=...)``.

``SageSLAConfig`` + ``apply_sage_sla`` / ``remove_sage_sla`` are the same in the shape of diffusers' hook configs,
with ``PRESETS`` for the measured shapes.

``patch`` / ``unpatch`` (and ``apply_sage_sla`` / ``remove_sage_sla``) import diffusers when called (it is
optional: ``pip install 'sagesla[diffusers]'``); importing this package does not.
"""

from sagesla.patching.checkpoints import LoadReport, load_sla_weights, save_sla_weights
from sagesla.patching.config import PRESETS, SageSLAConfig, apply_sage_sla, remove_sage_sla
from sagesla.patching.patch import patch, unpatch
from sagesla.patching.report import PatchReport
from sagesla.patching.timesteps import dense_timesteps

__all__ = [
    "PRESETS",
    "LoadReport",
    "PatchReport",
    "SageSLAConfig",
    "apply_sage_sla",
    "dense_timesteps",
    "load_sla_weights",
    "patch",
    "remove_sage_sla",
    "save_sla_weights",
    "unpatch",
]
