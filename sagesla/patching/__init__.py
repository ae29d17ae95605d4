"""Patching trained models: SLA in place of the self-attention of diffusers Wan models.

``patch`` / ``unpatch`` import diffusers when called (it is optional: ``pip install 'sagesla[diffusers]'``);
importing this package does not.
"""

from sagesla.patching.patch import patch, unpatch
from sagesla.patching.report import PatchReport

__all__ = ["PatchReport", "patch", "unpatch"]
