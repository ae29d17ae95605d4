"""Training the embedded video model: fresh noisy batches, the flow-matching and distillation losses, the loop.

Shared by ``scripts/train_tiny.py`` (flow matching from scratch) and ``scripts/finetune_tiny.py`` (SLA fine-tuning).
Shapes: N batch, C = 12 latent channels, F frames, H x W latent pixels (``LATENT_SHAPE``: [12, 16, 16, 16]),
E text_dim. Flow matching as diffusers' scheduler and ``sagesla.calibration.sampling.denoise`` sample: noised
latents ``sigma * noise + (1 - sigma) * x0`` at timestep ``1000 * sigma``, velocity ``noise - x0``.
"""

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sagesla import validation
from sagesla.embedded.videos import PROMPTS, render, to_latent

# The reported loss is the mean of the last LOSS_WINDOW steps (one step's loss is as noisy as its sigma draw).
LOSS_WINDOW = 50


def running_loss(losses: list[float]) -> float:
    """Mean of the last ``LOSS_WINDOW`` losses."""
    return sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:])


@dataclass(frozen=True)
class NoisyBatch:
    """One training batch.

    Attributes:
        latents: [N, C, F, H, W] fp32, the noised latents ``sigma * noise + (1 - sigma) * x0``.
        timesteps: [N] fp32, ``1000 * sigma``.
        text: [N, 4, E] prompt embeddings (in the embedding's graph, so a trained embedding gets gradients).
        velocity: [N, C, F, H, W] fp32, the flow-matching target ``noise - x0``.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor
    velocity: torch.Tensor


class Batches:
    """Fresh batches, reproducible from ``seed``: ``batch`` prompts drawn uniformly from ``PROMPTS``, their videos
    rendered on ``device`` with random placement, radius and speed, sigma drawn from a logit-normal moved by
    ``sigma_shift`` (``shift * s / (1 + (shift - 1) * s)``, the map the sampler's scheduler applies to its timesteps:
    with the sampler's shift, training sees noise levels as often as sampling visits them; at 1 the plain
    logit-normal, whose sigma > 0.9 has 1.4 % of the draws, while the sampler at shift 3 spends 4 of 10 steps there,
    where a video's layout and motion are decided). With ``text_dropout`` p, each sample's text embedding is zeroed
    (the null prompt) with probability p, so the model also learns the unconditional velocity that classifier-free
    guidance needs (``denoise(..., guidance=)``).

    Raises:
        ValueError: ``batch`` is not a positive int, ``text_dropout`` not in [0, 1) or ``sigma_shift`` not >= 1.
    """

    def __init__(
        self,
        batch: int,
        seed: int,
        device: str | torch.device,
        text_dropout: float = 0.0,
        sigma_shift: float = 1.0,
    ):
        validation.check_positive("batch", batch)
        if not validation.is_number(text_dropout) or not 0 <= text_dropout < 1:
            raise ValueError(f"`text_dropout` must be a float in [0, 1), got {text_dropout!r}")
        if not validation.is_number(sigma_shift) or not 1 <= sigma_shift < float("inf"):
            raise ValueError(f"`sigma_shift` must be a finite float >= 1 (1: no shift), got {sigma_shift!r}")
        self.batch, self.device, self.text_dropout = batch, torch.device(device), float(text_dropout)
        self.sigma_shift = float(sigma_shift)
        self._picker = random.Random(seed)
        self._generator = torch.Generator(self.device).manual_seed(seed)

    def draw(self, embedding: nn.Module) -> NoisyBatch:
        """The next batch; ``embedding`` maps the prompts to text embeddings [N, 4, E]."""
        prompts = self._picker.choices(PROMPTS, k=self.batch)
        x0 = to_latent(render(prompts, generator=self._generator, device=self.device))
        noise = torch.randn(x0.shape, generator=self._generator, device=self.device)
        sigma = torch.sigmoid(torch.randn(self.batch, generator=self._generator, device=self.device))
        sigma = self.sigma_shift * sigma / (1 + (self.sigma_shift - 1) * sigma)
        weight = sigma[:, None, None, None, None]
        text = embedding(prompts)
        if self.text_dropout:  # no draw at 0, so batches without dropout stay as they were
            keep = torch.rand(self.batch, generator=self._generator, device=self.device) >= self.text_dropout
            text = text * keep[:, None, None].to(text.dtype)
        return NoisyBatch(weight * noise + (1 - weight) * x0, sigma * 1000, text, noise - x0)


def predict(model: nn.Module, batch: NoisyBatch) -> torch.Tensor:
    """The velocity [N, C, F, H, W] a Wan transformer predicts for ``batch``."""
    return model(batch.latents, batch.timesteps, batch.text, return_dict=False)[0]


def flow_matching_loss(model: nn.Module, batch: NoisyBatch) -> torch.Tensor:
    """Mean squared error (fp32 scalar) of the predicted velocity against ``noise - x0``."""
    return F.mse_loss(predict(model, batch).float(), batch.velocity.float())


def distillation_loss(student: nn.Module, teacher: nn.Module, batch: NoisyBatch) -> torch.Tensor:
    """Mean squared error (fp32 scalar) of the student's velocity against the teacher's on the same noisy inputs.

    The teacher runs without gradients; the loss is exactly 0 where both compute the same velocity.
    """
    with torch.no_grad():
        target = predict(teacher, batch)
    return F.mse_loss(predict(student, batch).float(), target.float())


@dataclass(frozen=True)
class TrainingRun:
    """What ``fit`` did: the loss of every step and the wall time."""

    device: str
    losses: list[float]
    seconds: float

    @property
    def final_loss(self) -> float:
        """Mean loss of the last ``LOSS_WINDOW`` steps."""
        return running_loss(self.losses)

    def __str__(self) -> str:
        return (
            f"{len(self.losses)} steps in {self.seconds / 60:.1f} min on {self.device}; "
            f"loss {self.losses[0]:.4g} -> {self.final_loss:.4g}"
        )


def fit(loss: Callable[[], torch.Tensor], groups: list[dict], steps: int, device: str | torch.device) -> TrainingRun:
    """Minimise ``loss()`` (one fresh batch per call) for ``steps`` steps.

    AdamW (weight decay 0.01) with a one-cycle schedule peaking at each group's ``lr`` after 5 % of the steps, the
    gradient norm of all ``groups``' parameters clipped at 1, bf16 autocast on CUDA; a tqdm bar shows the mean loss.

    Args:
        loss: returns the fp32 scalar loss of a fresh batch.
        groups: torch optimizer parameter groups, each ``{"params": [...], "lr": float}``.
        steps: optimizer steps.
        device: where the model runs ("cuda" turns autocast on).
    Raises:
        ValueError: ``steps`` is not a positive int or a group's ``lr`` not a positive float.
    """
    from tqdm import tqdm

    validation.check_positive("steps", steps)
    for group in groups:
        validation.check_positive("lr", group["lr"], float)
    parameters = [parameter for group in groups for parameter in group["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[group["lr"] for group in groups], total_steps=steps, pct_start=0.05
    )
    device = torch.device(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    start, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc="training", unit="step")
    for _ in bar:
        with autocast:
            value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(value.item())
        bar.set_postfix(loss=f"{running_loss(losses):.4f}")
    return TrainingRun(str(device), losses, time.perf_counter() - start)
