"""Per-layer sparsity calibration (``sagesla.calibration``): choose each layer's topk within an error budget.

``calibrate`` runs the dense model over denoising steps and measures SageSLA at candidate topk values in every
self-attention layer (``Recording``, usable around any pipeline), then ``choose`` picks the smallest topk whose
error stays within the budget on every observation; or, for a target output PSNR, ``choose_at_quality`` spends
mean error where it buys the most sparsity and judges profiles on the model's output (``OutputJudge``), and
``budget_at_quality`` finds the budget rule's equal. The result is a ``Profile``: ``profile.save(path)``,
``load_profile(path)``, ``sagesla.patch(model, profile=path)``. ``summary`` and ``plot_profile`` show it.
Importing this package imports neither diffusers nor triton; calibrating a model needs diffusers.
"""

from sagesla.calibration.calibrate import calibrate
from sagesla.calibration.choose import choose
from sagesla.calibration.plot import plot_profile
from sagesla.calibration.quality import (
    OutputJudge,
    QualityBudget,
    budget_at_quality,
    choose_at_quality,
    lagrangian_path,
    output_psnr,
    sparsest_passing,
)
from sagesla.calibration.record import DEFAULT_CANDIDATES, Recording
from sagesla.calibration.summary import summary
from sagesla.profile import Measurements, Profile, ProfileError, load_profile

__all__ = [
    "DEFAULT_CANDIDATES",
    "Measurements",
    "OutputJudge",
    "Profile",
    "ProfileError",
    "QualityBudget",
    "Recording",
    "budget_at_quality",
    "calibrate",
    "choose",
    "choose_at_quality",
    "lagrangian_path",
    "load_profile",
    "output_psnr",
    "plot_profile",
    "sparsest_passing",
    "summary",
]
