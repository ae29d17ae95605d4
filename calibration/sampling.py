"""The denoising loop calibration runs: Euler flow matching (diffusers' scheduler) with the model's velocity.

Shapes: latents [B, C, F, H, W] (the model's latent space), text [B, T, text_dim] (prompt embeddings).
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from sagesla import validation

# Wan's flow shift: 3.0 at 480p, 5.0 at 720p (diffusers' Wan pipelines).
DEFAULT_SHIFT = 3.0


def scheduler(shift: float = DEFAULT_SHIFT):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` with ``shift`` (timesteps from 1000 down)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


def timesteps(shift: float, steps: int) -> list[float]:
    """The timestep of each of ``steps`` denoising steps, first to last."""
    schedule = scheduler(shift)
    schedule.set_timesteps(steps)
    return schedule.timesteps.tolist()


def bucket_edges(values: Sequence[float], buckets: int) -> tuple[float, ...]:
    """Edges splitting the distinct ``values`` into ``buckets`` groups of (nearly) equal size, at midpoints.

    Raises:
        ValueError: ``buckets`` is not in [1, number of distinct values].
    """
    distinct = sorted(set(values))
    if not validation.is_number(buckets, int) or not 1 <= buckets <= len(distinct):
        raise ValueError(f"`buckets` must be an int in [1, {len(distinct)}] (the distinct timesteps), got {buckets!r}")
    groups = torch.tensor(distinct, dtype=torch.float64).tensor_split(buckets)
    return tuple(float(low[-1] + high[0]) / 2 for low, high in zip(groups, groups[1:], strict=False))


def denoise(
    model: nn.Module,
    latents: torch.Tensor,
    text: torch.Tensor,
    steps: int,
    shift: float = DEFAULT_SHIFT,
    before_step: Callable[[int], None] | None = None,
    guidance: float = 1.0,
    negative_text: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample from noise ``latents`` with ``model`` (a Wan transformer predicting the flow velocity).

    Args:
        model: called as ``model(hidden_states=, timestep=, encoder_hidden_states=, return_dict=False)``.
        latents: [B, C, F, H, W] starting noise; text: [B, T, text_dim] prompt embeddings.
        steps: denoising steps; shift: the scheduler's timestep shift.
        before_step: called with each step's index before the model runs.
        guidance: classifier-free guidance scale; 1.0 runs the conditional forward alone, otherwise each step
            runs it and the one on ``negative_text`` and moves by ``v_neg + guidance * (v_text - v_neg)``.
        negative_text: [B, T, text_dim] (default: zeros, the null prompt of models trained with prompt dropout).
    Returns:
        the final latents [B, C, F, H, W] fp32.
    Raises:
        ValueError: ``guidance`` is not a finite float >= 1.
    """
    if not validation.is_number(guidance) or not 1 <= guidance < float("inf"):
        raise ValueError(f"`guidance` must be a finite float >= 1 (1: no guidance), got {guidance!r}")
    parameter = next(model.parameters())
    schedule = scheduler(shift)
    schedule.set_timesteps(steps, device=parameter.device)
    sample = latents.to(parameter.device, torch.float32)
    text = text.to(parameter.device, parameter.dtype)
    if guidance != 1:
        negative_text = torch.zeros_like(text) if negative_text is None else negative_text.to(text)

    def velocity(timestep: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(
                hidden_states=sample.to(parameter.dtype),
                timestep=timestep.expand(sample.shape[0]),
                encoder_hidden_states=prompt,
                return_dict=False,
            )[0].float()

    for index, timestep in enumerate(schedule.timesteps):
        if before_step is not None:
            before_step(index)
        moved = velocity(timestep, text)
        if guidance != 1:
            negative = velocity(timestep, negative_text)
            moved = negative + guidance * (moved - negative)
        sample = schedule.step(moved, timestep, sample, return_dict=False)[0]
    return sample
