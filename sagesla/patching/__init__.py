"""Patching trained models: SLA in place of the self-attention of diffusers Wan-family models, and SLA checkpoints.

``dense_timesteps`` gives the timestep ranges of a sampler's first / last steps for ``patch(..., dense_steps=...)``.

``patch`` / ``unpatch`` import diffusers when called (it is optional: ``pip install 'sagesla[diffusers]'``);
importing this package does not.
"""

from sagesla.patching.checkpoints import LoadReport, load_sla_weights, save_sla_weights
from sagesla.patching.patch import patch, unpatch
from sagesla.patching.report import PatchReport
from sagesla.patching.timesteps import dense_timesteps

__all__ = [
    "LoadReport",
    "PatchReport",
    "dense_timesteps",
    "load_sla_weights",
    "patch",
    "save_sla_weights",
    "unpatch",
]
