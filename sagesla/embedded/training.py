"""Training the embedded video model: fresh noisy batches, the flow-matching and distillation losses, the loop.

Shared by ``scripts/train_tiny.py`` (flow matching from scratch) and ``scripts/finetune_tiny.py`` (SLA fine-tuning).
Shapes: N batch, C = 12 latent channels, F frames, H x W latent pixels (``LATENT_SHAPE``: [12, 32, 32, 32]),
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
from sagesla.embedded.checkpoint import TrainingCheckpoint, TrainingState, capture, check_fits, restore, save_state
from sagesla.embedded.videos import PROMPTS, render, to_latent
from sagesla.files import check_output_path

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

    def state(self) -> dict:
        """Where the draws stand, for ``restore``: the settings the draws depend on (``batch``, the device type,
        ``text_dropout``, ``sigma_shift``), the prompt picker's ``random.Random`` state as JSON data (``picker``: a
        list) and the torch generator's state (``generator``: a uint8 tensor on the CPU)."""
        version, internal, gauss = self._picker.getstate()
        return {
            "batch": self.batch,
            "device": self.device.type,
            "text_dropout": self.text_dropout,
            "sigma_shift": self.sigma_shift,
            "picker": [version, list(internal), gauss],
            "generator": self._generator.get_state(),
        }

    def restore(self, state: dict) -> None:
        """Continue the draws where ``state`` (a ``state()``, maybe of another ``Batches``) left them: the next
        ``draw`` is the one that would have followed ``state()``.

        Raises:
            ValueError: ``state`` was drawn with other settings (naming them) or is not a ``state()``; nothing
                changes then.
        """
        ours = self.state()
        settings = ("batch", "device", "text_dropout", "sigma_shift")
        differ = [f"{key} {state.get(key)!r} (here {ours[key]!r})" for key in settings if state.get(key) != ours[key]]
        if differ:
            raise ValueError(f"`state` was drawn with other settings: {', '.join(differ)}")
        # Fill new sources first, so a bad state leaves this one as it was.
        picker, generator = random.Random(), torch.Generator(self.device)
        try:
            version, internal, gauss = state["picker"]
            picker.setstate((version, tuple(internal), gauss))
            generator.set_state(state["generator"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"`state` is not a Batches state (picker, generator): {error}") from error
        self._picker, self._generator = picker, generator


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
    """What ``fit`` did: the loss of every step so far (a resumed run's earlier steps included), the wall time of
    this call, the run's total steps and the steps done before this call (0 unless resumed)."""

    device: str
    losses: list[float]
    seconds: float
    steps: int
    start: int = 0

    @property
    def finished(self) -> bool:
        """Whether all ``steps`` are done (not when ``stop_after`` ended the call early)."""
        return len(self.losses) >= self.steps

    @property
    def final_loss(self) -> float:
        """Mean loss of the last ``LOSS_WINDOW`` steps."""
        return running_loss(self.losses)

    def __str__(self) -> str:
        done = len(self.losses)
        if self.start == 0 and self.finished:
            steps = f"{done} steps"
        elif done > self.start:
            steps = f"steps {self.start + 1}-{done} of {self.steps}"
        else:
            steps = f"no steps left of {self.steps}"
        return (
            f"{steps} in {self.seconds / 60:.1f} min on {self.device}; "
            f"loss {self.losses[0]:.4g} -> {self.final_loss:.4g}"
        )


def fit(
    loss: Callable[[], torch.Tensor],
    groups: list[dict],
    steps: int,
    device: str | torch.device,
    checkpoint: TrainingCheckpoint | None = None,
    resume: TrainingState | None = None,
) -> TrainingRun:
    """Minimise ``loss()`` (one fresh batch per call) for ``steps`` steps, or continue a run that stopped.

    AdamW (weight decay 0.01) with a one-cycle schedule peaking at each group's ``lr`` after 5 % of the steps, the
    gradient norm of all ``groups``' parameters clipped at 1, bf16 autocast on CUDA; a tqdm bar shows the mean loss.
    With ``checkpoint`` the training state (``sagesla.embedded.checkpoint``) is written every ``checkpoint.every``
    steps and after the call's last step; ``checkpoint.stop_after`` ends the call early. With ``resume`` (a state
    ``load_state`` read) the modules, optimizer, schedule and batch source continue from its step: the split run
    ends as one uninterrupted run would (bit for bit on the CPU; on CUDA up to its non-deterministic kernels).

    Args:
        loss: returns the fp32 scalar loss of a fresh batch (drawn from ``checkpoint.batches`` when checkpointed).
        groups: torch optimizer parameter groups, each ``{"params": [...], "lr": float}``.
        steps: the run's total optimizer steps (the same when resuming).
        device: where the model runs ("cuda" turns autocast on).
        checkpoint: where, how often and what to write; None: no state file.
        resume: the state to continue from; needs ``checkpoint`` (its modules and batches are restored).
    Returns:
        The ``TrainingRun``; ``finished`` is False when ``stop_after`` ended it before the last step.
    Raises:
        ValueError: ``steps`` is not a positive int, a group's ``lr`` not a positive float, ``resume`` without
            ``checkpoint``, a trained parameter outside ``checkpoint.modules``, or ``resume`` does not fit the run
            (naming its file and what differs); all before the first step.
        TypeError: ``checkpoint`` or ``resume`` of the wrong kind.
        OSError: ``checkpoint.path`` cannot be written, before the first step.
    """
    from tqdm import tqdm

    validation.check_positive("steps", steps)
    for group in groups:
        validation.check_positive("lr", group["lr"], float)
    if checkpoint is not None and not isinstance(checkpoint, TrainingCheckpoint):
        raise TypeError(f"`checkpoint` must be a TrainingCheckpoint or None, got {type(checkpoint).__name__}")
    if resume is not None and not isinstance(resume, TrainingState):
        raise TypeError(f"`resume` must be a TrainingState (load_state) or None, got {type(resume).__name__}")
    if resume is not None and checkpoint is None:
        raise ValueError("`resume` needs `checkpoint`: its modules and batches are what the state restores")
    parameters = [parameter for group in groups for parameter in group["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[group["lr"] for group in groups], total_steps=steps, pct_start=0.05
    )
    losses = []
    if checkpoint is not None:
        check_output_path(checkpoint.path)
        fresh = capture(checkpoint, optimizer, schedule, steps, losses)
        if resume is not None:
            check_fits(resume, fresh)
            restore(resume, checkpoint, optimizer, schedule)
            losses = list(resume.losses)
    first = len(losses)
    last = steps if checkpoint is None or checkpoint.stop_after is None else min(steps, first + checkpoint.stop_after)
    device = torch.device(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    start = time.perf_counter()
    bar = tqdm(range(first, last), desc="training", unit="step", initial=first, total=steps)
    for step in bar:
        with autocast:
            value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(value.item())
        bar.set_postfix(loss=f"{running_loss(losses):.4f}")
        if checkpoint is not None and ((step + 1) % checkpoint.every == 0 or step + 1 == last):
            save_state(checkpoint.path, capture(checkpoint, optimizer, schedule, steps, losses))
    return TrainingRun(str(device), losses, time.perf_counter() - start, steps, first)
