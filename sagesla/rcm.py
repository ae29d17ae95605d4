"""rCM few-step sampling for TurboDiffusion's step-distilled Wan models, in diffusers' Wan pipelines.

TurboDiffusion distils Wan with rCM: its models sample in 1 to 4 steps, without classifier-free guidance, on this
schedule (its inference scripts, reproduced here in float64 as they compute it):

- TrigFlow times ``[atan(sigma_max), 1.5, 1.4, 1.0][:steps] + [0]``, mapped to rectified-flow sigmas by
  ``t -> sin(t) / (sin(t) + cos(t))`` (so the first sigma is ``sigma_max / (1 + sigma_max)``). Wan2.1 T2V uses
  ``sigma_max`` 80: 0.9877, 0.9338, 0.8529, 0.6090, 0 for 4 steps; Wan2.2 I2V A14B uses 200 (first sigma 0.9950).
- Start: ``x = noise * sigmas[0]`` with ``noise`` ~ N(0, 1) float32 from one seeded generator.
- Each step the model sees ``x`` in its dtype and the timestep ``sigma * 1000`` and predicts the flow velocity ``v``
  (``x0 = x - sigma * v``). Stochastic step (the default):
  ``x = (1 - sigma_next) * (x - sigma * v) + sigma_next * n``, ``n`` ~ N(0, 1) float32 drawn from the same
  generator, once per step (also at the last, where ``sigma_next`` is 0). ODE step:
  ``x = x - (sigma - sigma_next) * v``.
- Wan2.2 A14B: the high-noise expert runs while ``sigma >= 0.9``, the low-noise one below: diffusers'
  ``WanImageToVideoPipeline`` with ``transformer_2`` and ``boundary_ratio=0.9`` switches exactly there.

``RCMScheduler`` is that schedule as a diffusers scheduler; ``rcm_sample`` runs a ``WanPipeline`` or
``WanImageToVideoPipeline`` with it in one call; ``rcm_sigmas`` gives the sigmas.

Example (Wan2.1 T2V 1.3B; ``sagesla convert-turbodiffusion TurboWan2.1-T2V-1.3B-480P.pth turbo-t2v`` wrote the
diffusers transformer folder ``turbo-t2v``, SLA weights included)::

    import torch
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from diffusers.utils import export_to_video

    import sagesla
    from sagesla.rcm import rcm_sample

    base = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    vae = AutoencoderKLWan.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32)
    transformer = WanTransformer3DModel.from_pretrained("turbo-t2v", torch_dtype=torch.bfloat16)
    pipe = WanPipeline.from_pretrained(base, vae=vae, transformer=transformer, torch_dtype=torch.bfloat16).to("cuda")
    sagesla.patch(pipe, topk=0.1)
    sagesla.load_sla_weights(pipe.transformer, "turbo-t2v")
    video = rcm_sample(pipe, prompt="A cat surfing a wave", generator=torch.Generator("cuda").manual_seed(0))
    export_to_video(video.frames[0], "cat.mp4", fps=16)

Example (Wan2.2 I2V A14B: two experts, each converted from its ``TurboWan2.2-I2V-A14B-{high,low}-720P.pth``)::

    from diffusers import WanImageToVideoPipeline
    from diffusers.utils import load_image

    base = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
    vae = AutoencoderKLWan.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32)
    high = WanTransformer3DModel.from_pretrained("turbo-i2v-high", torch_dtype=torch.bfloat16)
    low = WanTransformer3DModel.from_pretrained("turbo-i2v-low", torch_dtype=torch.bfloat16)
    pipe = WanImageToVideoPipeline.from_pretrained(
        base, vae=vae, transformer=high, transformer_2=low, boundary_ratio=0.9, torch_dtype=torch.bfloat16
    ).to("cuda")
    sagesla.patch(pipe, topk=0.1)  # both experts
    sagesla.load_sla_weights(pipe.transformer, "turbo-i2v-high")
    sagesla.load_sla_weights(pipe.transformer_2, "turbo-i2v-low")
    video = rcm_sample(  # sigma_max 200, the I2V default
        pipe, image=load_image("first_frame.png"), prompt="The cat jumps", height=720, width=1280,
        generator=torch.Generator("cuda").manual_seed(0),
    )
"""

import inspect
import math

import torch
from diffusers import DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from sagesla import validation

MAX_STEPS = 4
# TrigFlow times of the steps after the first (TurboDiffusion's choice "for better visual quality").
MID_TIMES = (1.5, 1.4, 1.0)
T2V_SIGMA_MAX = 80.0
I2V_SIGMA_MAX = 200.0
# rcm_sample sets these itself: the models sample without guidance, in ``steps`` steps, from its own start noise.
RESERVED_CALL_KWARGS = ("guidance_scale", "guidance_scale_2", "num_inference_steps", "latents")
# The pipelines rcm_sample serves (by class name), with their default sigma_max.
PIPELINE_SIGMA_MAX = {"WanPipeline": T2V_SIGMA_MAX, "WanImageToVideoPipeline": I2V_SIGMA_MAX}


def _check_steps(steps: object, name: str = "steps") -> None:
    if not validation.is_number(steps, int):
        raise TypeError(f"`{name}` must be an int in 1..{MAX_STEPS}, got {type(steps).__name__} {steps!r}")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"`{name}` must be in 1..{MAX_STEPS} (rCM models are distilled for 1 to 4 steps), got {steps}")


def _check_sigma_max(sigma_max: object) -> None:
    if not validation.is_number(sigma_max):
        raise TypeError(f"`sigma_max` must be a finite float > 0, got {type(sigma_max).__name__} {sigma_max!r}")
    if not (math.isfinite(sigma_max) and sigma_max > 0):
        raise ValueError(f"`sigma_max` must be a finite float > 0, got {sigma_max!r}")


def rcm_sigmas(steps: int, sigma_max: float) -> torch.Tensor:
    """The rectified-flow sigmas of an rCM sample: ``sin(t) / (sin(t) + cos(t))`` of the TrigFlow times
    ``atan(sigma_max)``, ``MID_TIMES[:steps - 1]`` and 0.

    Args:
        steps: sampling steps, 1..4.
        sigma_max: the first step's TrigFlow noise scale (80 for Wan2.1 T2V, 200 for Wan2.2 I2V A14B); with 2 or more
            steps it must exceed tan(1.5) ~ 14.1, so that the sigmas decrease.
    Returns:
        [steps + 1] float64 on the CPU, from ``sigma_max / (1 + sigma_max)`` down to 0.
    Raises:
        TypeError: ``steps`` is not an int, ``sigma_max`` not a number.
        ValueError: ``steps`` is outside 1..4, ``sigma_max`` not finite and > 0, or too small for ``steps``.
    """
    _check_steps(steps)
    _check_sigma_max(sigma_max)
    if steps > 1 and math.atan(sigma_max) <= MID_TIMES[0]:
        raise ValueError(
            f"`sigma_max` must exceed tan({MID_TIMES[0]}) = {math.tan(MID_TIMES[0]):.4f} for {steps} steps (the times "
            f"must decrease), got {sigma_max!r}"
        )
    times = torch.tensor([math.atan(sigma_max), *MID_TIMES[: steps - 1], 0.0], dtype=torch.float64)
    return torch.sin(times) / (torch.sin(times) + torch.cos(times))


class RCMScheduler(SchedulerMixin, ConfigMixin):
    """The rCM sampler of TurboDiffusion's step-distilled models as a diffusers scheduler.

    Use it as ``pipe.scheduler = RCMScheduler(sigma_max=80.0)`` with ``WanPipeline`` / ``WanImageToVideoPipeline``
    and ``guidance_scale=1.0``; the pipeline's latents must start as ``randn * init_noise_sigma`` (Wan pipelines do
    not scale them: ``rcm_sample`` builds them). ``step`` keeps the sample in float64 between steps while the
    pipeline holds it in its own dtype. The step noise comes from ``step``'s ``generator``, else the one given to
    ``set_noise_generator``, else a ``torch.Generator(device).manual_seed(0)`` made by ``set_timesteps``: without a
    generator, sampling is deterministic.

    Args:
        sigma_max: the first step's TrigFlow noise scale (80 for Wan2.1 T2V, 200 for Wan2.2 I2V A14B).
        num_train_timesteps: the model's timestep scale (timestep = sigma * num_train_timesteps).
        stochastic: True: rCM's stochastic step (fresh noise each step); False: the Euler ODE step.
    Raises:
        TypeError, ValueError: an argument of the wrong kind or value, named.
    """

    _compatibles = []
    order = 1

    @register_to_config
    def __init__(self, sigma_max: float = T2V_SIGMA_MAX, num_train_timesteps: int = 1000, stochastic: bool = True):
        _check_sigma_max(sigma_max)
        validation.check_positive("num_train_timesteps", num_train_timesteps)
        validation.check_bool("stochastic", stochastic)
        # The first sigma does not depend on the number of steps.
        self.init_noise_sigma = rcm_sigmas(1, sigma_max)[0].item()
        self.num_inference_steps: int | None = None
        self.sigmas: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self._timesteps_cpu: list[float] = []
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._noise_generator: torch.Generator | None = None
        self._default_generator: torch.Generator | None = None
        self._state: torch.Tensor | None = None
        self._returned: tuple[torch.Tensor, int] | None = None

    @property
    def step_index(self) -> int | None:
        """The index of the next step (None before ``set_timesteps``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The index ``set_begin_index`` set, else None."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at step ``begin_index`` of the schedule (diffusers pipelines set 0 before their loop)."""
        if not validation.is_number(begin_index, int) or begin_index < 0:
            raise ValueError(f"`begin_index` must be an int >= 0, got {begin_index!r}")
        self._begin_index = self._step_index = begin_index

    def set_noise_generator(self, generator: torch.Generator | None) -> None:
        """Draw the step noise from ``generator`` (None: the seed-0 generator ``set_timesteps`` makes)."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")
        self._noise_generator = generator

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Set the schedule of ``num_inference_steps`` (1..4) steps and start at its first step.

        Sets ``sigmas`` ([steps + 1] float64, CPU) and ``timesteps`` ([steps] float32 on ``device``:
        ``sigma * num_train_timesteps``), and a fresh seed-0 step-noise generator on ``device``.

        Raises:
            TypeError, ValueError: ``num_inference_steps`` is not an int in 1..4.
        """
        _check_steps(num_inference_steps, "num_inference_steps")
        self.sigmas = rcm_sigmas(num_inference_steps, self.config.sigma_max)
        # float32 sigma times 1000 is exact in float64, so this rounds as TurboDiffusion's timesteps do.
        timesteps = self.sigmas[:-1].to(torch.float32) * self.config.num_train_timesteps
        self._timesteps_cpu = timesteps.tolist()
        self.timesteps = timesteps.to(device)
        self.num_inference_steps = num_inference_steps
        self._step_index, self._begin_index = 0, None
        self._default_generator = torch.Generator(device or "cpu").manual_seed(0)
        self._state = self._returned = None

    def _check_timestep(self, timestep: float | torch.Tensor) -> int:
        """The index of the current step, after checking that ``timestep`` is its timestep."""
        if self._step_index is None:
            raise RuntimeError("RCMScheduler.step() needs set_timesteps(num_inference_steps) first")
        index = self._step_index
        if index >= self.num_inference_steps:
            raise RuntimeError(
                f"RCMScheduler.step(): all {self.num_inference_steps} steps are done; call set_timesteps() to sample "
                "again"
            )
        expected = self._timesteps_cpu[index]
        # Neighbouring steps lie >= 50 timesteps apart: allow rounding (e.g. a bf16 copy), not another step's.
        if not math.isclose(float(timestep), expected, rel_tol=0, abs_tol=1e-3 * self.config.num_train_timesteps):
            raise ValueError(
                f"`timestep` must be the current step's, timesteps[{index}] = {expected}, got {float(timestep)}"
            )
        return index

    def _float64_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """The float64 state if ``sample`` is what the last step returned, unchanged; else ``sample`` in float64."""
        if self._returned is not None:
            returned, version = self._returned
            # A callback may replace the latents or change them in place: then they are the sample.
            if sample is returned and sample._version == version:
                return self._state
        return sample.to(torch.float64)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One rCM step from ``timestep`` to the next sigma.

        Args:
            model_output: [B, C, F, H, W] the model's flow velocity at ``sample``.
            timestep: the current step's entry of ``timesteps``.
            sample: [B, C, F, H, W] the current latents.
            generator: the step noise's generator for this step (default: see the class docstring).
            return_dict: return a ``SchedulerOutput`` rather than a tuple.
        Returns:
            the next latents [B, C, F, H, W] in ``sample``'s dtype (``prev_sample``), as diffusers schedulers do.
        Raises:
            RuntimeError: no ``set_timesteps`` before, or all its steps are done.
            ValueError: ``timestep`` is not the current step's; ``model_output`` and ``sample`` differ in shape.
        """
        index = self._check_timestep(timestep)
        if model_output.shape != sample.shape:
            raise ValueError(
                f"`model_output` must have the shape of `sample` {tuple(sample.shape)}, got {tuple(model_output.shape)}"
            )
        x = self._float64_sample(sample)
        velocity = model_output.to(torch.float64)
        sigma, sigma_next = self.sigmas[index].item(), self.sigmas[index + 1].item()
        if self.config.stochastic:
            if generator is None:
                generator = self._default_generator if self._noise_generator is None else self._noise_generator
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
            # sigma_next * noise is a float32 product, as TurboDiffusion's type promotion makes it.
            x = (1 - sigma_next) * (x - sigma * velocity) + sigma_next * noise
        else:
            x = x - (sigma - sigma_next) * velocity
        self._step_index = index + 1
        self._state = x
        prev_sample = x.to(sample.dtype)
        self._returned = (prev_sample, prev_sample._version)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _pipeline_kind(pipe: object) -> str:
    """The name of the ``PIPELINE_SIGMA_MAX`` class ``pipe`` is an instance of."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    for kind in (WanPipeline, WanImageToVideoPipeline):
        if isinstance(pipe, kind):
            return kind.__name__
    raise TypeError(f"`pipe` must be a diffusers WanPipeline or WanImageToVideoPipeline, got {type(pipe).__name__}")


def _latent_shape(pipe: DiffusionPipeline, kind: str, call_kwargs: dict) -> tuple[int, int, int, int, int]:
    """[B, C, F, H, W] of the latents ``pipe(**call_kwargs)`` would draw, computed as the pipeline (of ``kind``, its
    ``_pipeline_kind``) computes it."""
    defaults = inspect.signature(type(pipe).__call__).parameters

    def argument(name: str) -> object:
        return call_kwargs.get(name, defaults[name].default)

    temporal, spatial = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    num_frames = argument("num_frames")
    if num_frames % temporal != 1:
        num_frames = num_frames // temporal * temporal + 1
    num_frames = max(num_frames, 1)
    transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    patch = transformer.config.patch_size
    height = argument("height") // (spatial * patch[1]) * (spatial * patch[1])
    width = argument("width") // (spatial * patch[2]) * (spatial * patch[2])
    prompt, prompt_embeds = argument("prompt"), argument("prompt_embeds")
    if isinstance(prompt, str):
        batch = 1
    elif isinstance(prompt, list):
        batch = len(prompt)
    elif isinstance(prompt_embeds, torch.Tensor):
        batch = prompt_embeds.shape[0]
    else:
        raise ValueError("rcm_sample needs `prompt` (a str or list of str) or `prompt_embeds` (a tensor [B, T, D])")
    batch *= argument("num_videos_per_prompt")
    # The I2V pipeline draws vae.config.z_dim channels (its transformer also reads the condition), T2V in_channels.
    channels = pipe.vae.config.z_dim if kind == "WanImageToVideoPipeline" else transformer.config.in_channels
    return (batch, channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial)


def rcm_sample(
    pipe: DiffusionPipeline,
    *,
    steps: int = MAX_STEPS,
    generator: torch.Generator | None = None,
    sigma_max: float | None = None,
    stochastic: bool = True,
    **call_kwargs,
):
    """Sample with an rCM-distilled model (TurboDiffusion's) in a diffusers Wan pipeline, in ``steps`` steps.

    Puts an ``RCMScheduler`` on ``pipe`` (in place: it stays there after the call), draws the start latents
    ``randn(shape, generator) * sigmas[0]`` (float32 on the pipeline's execution device, the shape the pipeline itself
    would draw), gives the same generator to the scheduler for the step noise (one stream, as TurboDiffusion draws
    it), and calls ``pipe(..., num_inference_steps=steps, guidance_scale=1.0, latents=..., generator=generator)``.

    Args:
        pipe: a ``WanPipeline`` (T2V) or ``WanImageToVideoPipeline`` (I2V; with ``transformer_2`` and
            ``boundary_ratio=0.9`` for Wan2.2 A14B's two experts).
        steps: sampling steps, 1..4.
        generator: the start and step noise's generator; None: one on the execution device seeded from torch's
            global RNG (``torch.manual_seed`` makes the sample repeatable).
        sigma_max: the first step's TrigFlow noise scale; None: 80 for ``WanPipeline``, 200 for
            ``WanImageToVideoPipeline`` (TurboDiffusion's defaults).
        stochastic: rCM's stochastic step (True) or the Euler ODE step.
        **call_kwargs: the pipeline's other arguments (``prompt`` or ``prompt_embeds``, ``image``, ``height``,
            ``width``, ``num_frames``, ``output_type``, ...).
    Returns:
        what ``pipe(...)`` returns (e.g. ``WanPipelineOutput`` with ``.frames``).
    Raises:
        TypeError: ``pipe`` is not a Wan T2V / I2V pipeline, ``generator`` not a torch.Generator, ``stochastic`` not
            a bool, or ``call_kwargs`` holds an argument rcm_sample sets (``guidance_scale``, ``guidance_scale_2``,
            ``num_inference_steps``, ``latents``).
        ValueError: ``steps`` or ``sigma_max`` out of range; neither ``prompt`` nor ``prompt_embeds``.
    """
    kind = _pipeline_kind(pipe)
    _check_steps(steps)
    reserved = [name for name in RESERVED_CALL_KWARGS if name in call_kwargs]
    if reserved:
        raise TypeError(
            f"rcm_sample sets {', '.join(f'`{name}`' for name in reserved)} itself (rCM models sample without "
            f"classifier-free guidance, in `steps` steps, from its own start noise): leave "
            f"{'it' if len(reserved) == 1 else 'them'} out"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be one torch.Generator or None, got {type(generator).__name__}")
    if sigma_max is None:
        sigma_max = PIPELINE_SIGMA_MAX[kind]
    scheduler = RCMScheduler(sigma_max=sigma_max, stochastic=stochastic)
    device = pipe._execution_device
    # Checks sigma_max against steps before any work; the pipeline sets the same schedule again.
    scheduler.set_timesteps(steps, device=device)
    shape = _latent_shape(pipe, kind, call_kwargs)
    if generator is None:
        generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, ())))
    latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * scheduler.init_noise_sigma
    scheduler.set_noise_generator(generator)
    pipe.scheduler = scheduler
    return pipe(num_inference_steps=steps, guidance_scale=1.0, latents=latents, generator=generator, **call_kwargs)
