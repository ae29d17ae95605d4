"""rCM few-step sampling: the sigmas against TurboDiffusion's numbers and formula, RCMScheduler in diffusers' Wan T2V
and I2V pipelines and in a plain loop, each against a reference loop transcribing TurboDiffusion's sampler."""

import math
import types

import pytest
import torch

import sagesla
from sagesla.rcm import RCMScheduler, rcm_sample, rcm_sigmas

diffusers = pytest.importorskip("diffusers")

from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel  # noqa: E402

from sagesla.embedded import model as embedded  # noqa: E402
from sagesla.wan_shapes import TINY_WAN_CONFIG  # noqa: E402

# TurboDiffusion's Wan2.1 T2V sigmas (sigma_max 80, 4 steps), as its inference script computes them.
T2V_SIGMAS = (0.9877, 0.9338, 0.8529, 0.6090, 0.0)
MID_TIMES = (1.5, 1.4, 1.0)
# The pipelines hold the latents in float32: the start x = noise * sigma_0 is rounded once to float32 (the reference
# keeps it in float64), which moves the fp32 tiny models' 1 to 4 step samples by < 1e-6.
PIPELINE_TOL = 1e-5
TEXT = torch.Generator().manual_seed(7)
PROMPT_EMBEDS = torch.randn(1, 8, TINY_WAN_CONFIG["text_dim"], generator=TEXT)
# 32 x 32 pixels, 5 frames: latents [1, 16, 2, 4, 4] (the tiny VAE downsamples 8x in space, 4x in time).
SIZE = {"height": 32, "width": 32, "num_frames": 5}


def formula_sigmas(steps: int, sigma_max: float) -> torch.Tensor:
    """TurboDiffusion's schedule: TrigFlow times through sin / (sin + cos), float64, as its scripts compute it."""
    times = torch.tensor([math.atan(sigma_max), *MID_TIMES[: steps - 1], 0.0], dtype=torch.float64)
    return torch.sin(times) / (torch.cos(times) + torch.sin(times))


def velocity(model, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, condition=None) -> torch.Tensor:
    """The model's flow velocity at float64 ``x`` and ``sigma`` (timestep sigma * 1000), in float64."""
    hidden = x if condition is None else torch.cat([x, condition], dim=1)
    with torch.no_grad():
        return model(
            hidden_states=hidden.to(model.dtype),
            timestep=(sigma.float() * 1000).expand(x.shape[0]),
            encoder_hidden_states=text.to(model.dtype),
            return_dict=False,
        )[0].to(torch.float64)


def reference_sample(model, text, shape, seed, steps, sigma_max, stochastic=True) -> torch.Tensor:
    """TurboDiffusion's rCM loop written out: float64 state, start and step noise from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    sigmas = formula_sigmas(steps, sigma_max)
    x = torch.randn(shape, dtype=torch.float32, generator=generator).to(torch.float64) * sigmas[0]
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        v = velocity(model, x, t_cur, text)
        if stochastic:
            noise = torch.randn(shape, dtype=torch.float32, generator=generator)
            x = (1 - t_next) * (x - t_cur * v) + t_next * noise
        else:
            x = x - (t_cur - t_next) * v
    return x


def scheduler_loop(model, latents: torch.Tensor, text: torch.Tensor, scheduler: RCMScheduler) -> torch.Tensor:
    """Drive ``scheduler`` as ``calibration/sampling.py: denoise`` drives diffusers' scheduler."""
    sample = latents
    for timestep in scheduler.timesteps:
        with torch.no_grad():
            v = model(
                hidden_states=sample.to(model.dtype),
                timestep=timestep.expand(sample.shape[0]),
                encoder_hidden_states=text,
                return_dict=False,
            )[0]
        sample = scheduler.step(v, timestep, sample, return_dict=False)[0]
    return sample


@pytest.fixture(scope="module")
def pipelines() -> tuple[type, type]:
    """(WanPipeline, WanImageToVideoPipeline), diffusers' own classes (they need transformers installed)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    return WanPipeline, WanImageToVideoPipeline


def tiny_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


def tiny_transformer(seed: int, **config) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY_WAN_CONFIG, **config}).eval()


@pytest.fixture(scope="module")
def t2v(pipelines):
    pipe = pipelines[0](
        tokenizer=None, text_encoder=None, vae=tiny_vae(), scheduler=RCMScheduler(), transformer=tiny_transformer(1)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def i2v(pipelines):
    """Wan2.2 A14B's layout: two experts of in_channels 36 (latents + mask + image condition), no image encoder."""
    pipe = pipelines[1](
        tokenizer=None,
        text_encoder=None,
        vae=tiny_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=tiny_transformer(2, in_channels=36),
        transformer_2=tiny_transformer(3, in_channels=36),
        boundary_ratio=0.9,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def t2v_sample(pipe, seed: int, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    kwargs = {**SIZE, "output_type": "latent", **kwargs}
    return rcm_sample(pipe, prompt_embeds=PROMPT_EMBEDS, generator=generator, **kwargs).frames


def test_sigmas_are_turbodiffusions():
    assert torch.allclose(rcm_sigmas(4, 80.0), torch.tensor(T2V_SIGMAS, dtype=torch.float64), atol=5e-5, rtol=0)
    assert rcm_sigmas(4, 200.0)[0].item() == pytest.approx(200 / 201, abs=1e-15)
    assert rcm_sigmas(4, 200.0)[1:].tolist() == rcm_sigmas(4, 80.0)[1:].tolist()
    for steps in (1, 2, 3):
        sigmas = rcm_sigmas(steps, 80.0)
        assert sigmas.tolist() == [*rcm_sigmas(4, 80.0)[:steps].tolist(), 0.0]


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("sigma_max", [15.0, 80.0, 200, 1e6])
def test_sigmas_follow_the_formula(steps, sigma_max):
    sigmas = rcm_sigmas(steps, sigma_max)
    times = [math.atan(sigma_max), *MID_TIMES[: steps - 1], 0.0]
    expected = [math.sin(t) / (math.sin(t) + math.cos(t)) for t in times]
    assert sigmas.dtype == torch.float64 and sigmas.shape == (steps + 1,)
    assert sigmas.tolist() == pytest.approx(expected, abs=1e-15, rel=0)
    assert sigmas[0].item() == pytest.approx(sigma_max / (1 + sigma_max), rel=1e-14)
    assert (sigmas.diff() < 0).all()


@pytest.mark.parametrize(
    ("steps", "sigma_max", "error", "match"),
    [
        (0, 80.0, ValueError, r"`steps` must be in 1\.\.4 .*got 0"),
        (5, 80.0, ValueError, r"`steps` must be in 1\.\.4 .*got 5"),
        (4.0, 80.0, TypeError, r"`steps` must be an int in 1\.\.4, got float 4\.0"),
        (True, 80.0, TypeError, r"`steps` must be an int"),
        (4, 0.0, ValueError, r"`sigma_max` must be a finite float > 0, got 0\.0"),
        (4, -80.0, ValueError, r"`sigma_max` must be a finite float > 0"),
        (4, math.inf, ValueError, r"`sigma_max` must be a finite float > 0, got inf"),
        (4, math.nan, ValueError, r"`sigma_max` must be a finite float > 0, got nan"),
        (4, "80", TypeError, r"`sigma_max` must be a finite float > 0, got str '80'"),
        (2, 10.0, ValueError, r"`sigma_max` must exceed tan\(1\.5\) = 14\.1014 for 2 steps"),
    ],
)
def test_sigmas_reject_bad_arguments(steps, sigma_max, error, match):
    with pytest.raises(error, match=match):
        rcm_sigmas(steps, sigma_max)


def test_one_step_takes_any_positive_sigma_max():
    assert rcm_sigmas(1, 10.0).tolist() == pytest.approx([10 / 11, 0.0], abs=1e-15)


def test_scheduler_schedule_and_config():
    scheduler = RCMScheduler(sigma_max=200.0)
    assert scheduler.init_noise_sigma == rcm_sigmas(1, 200.0)[0].item() and scheduler.order == 1
    scheduler.set_timesteps(3, device="cpu")
    assert torch.equal(scheduler.sigmas, rcm_sigmas(3, 200.0))
    assert scheduler.timesteps.dtype == torch.float32
    assert torch.equal(scheduler.timesteps, rcm_sigmas(3, 200.0)[:-1].float() * 1000)
    assert scheduler.init_noise_sigma == scheduler.sigmas[0].item() and scheduler.step_index == 0
    copy = RCMScheduler.from_config(scheduler.config)
    assert dict(copy.config) == dict(scheduler.config)
    assert (copy.config.sigma_max, copy.config.num_train_timesteps, copy.config.stochastic) == (200.0, 1000, True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sigma_max": -1.0}, ValueError, "`sigma_max` must be a finite float > 0"),
        ({"num_train_timesteps": 0}, ValueError, "`num_train_timesteps` must be a positive int, got 0"),
        ({"stochastic": 1}, TypeError, "`stochastic` must be a bool, got int 1"),
    ],
)
def test_scheduler_rejects_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        RCMScheduler(**kwargs)


def test_scheduler_errors_name_what_is_wrong():
    scheduler = RCMScheduler()
    sample = torch.zeros(1, 2, 1, 2, 2)
    with pytest.raises(RuntimeError, match=r"needs set_timesteps\(num_inference_steps\) first"):
        scheduler.step(sample, 987.65, sample)
    with pytest.raises(ValueError, match=r"`num_inference_steps` must be in 1\.\.4 .*got 5"):
        scheduler.set_timesteps(5)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match=r"`timestep` must be the current step's, timesteps\[0\] = 987\.65.*got 933"):
        scheduler.step(sample, scheduler.timesteps[1], sample)
    with pytest.raises(ValueError, match=r"`model_output` must have the shape of `sample` \(1, 2, 1, 2, 2\)"):
        scheduler.step(sample[:, :1], scheduler.timesteps[0], sample)
    for timestep in scheduler.timesteps:
        sample = scheduler.step(torch.zeros_like(sample), timestep, sample, return_dict=False)[0]
    with pytest.raises(RuntimeError, match=r"all 2 steps are done; call set_timesteps\(\) to sample again"):
        scheduler.step(sample, scheduler.timesteps[-1], sample)


def step_noise(scheduler: RCMScheduler, **step_kwargs) -> torch.Tensor:
    """The first step's noise: with a zero sample and velocity the step returns sigma_1 * noise."""
    scheduler.set_timesteps(2)
    zeros = torch.zeros(2, 3, 1, 2, 2, dtype=torch.float64)
    moved = scheduler.step(zeros, scheduler.timesteps[0], zeros, **step_kwargs).prev_sample
    return (moved / scheduler.sigmas[1]).float()


def test_step_noise_comes_from_the_step_then_the_set_then_a_seed_0_generator():
    shape = (2, 3, 1, 2, 2)

    def draw(seed: int) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    scheduler = RCMScheduler()
    assert torch.allclose(step_noise(scheduler), draw(0), rtol=1e-6, atol=0)
    scheduler.set_noise_generator(torch.Generator().manual_seed(5))
    assert torch.allclose(step_noise(scheduler), draw(5), rtol=1e-6, atol=0)
    assert torch.allclose(step_noise(scheduler, generator=torch.Generator().manual_seed(9)), draw(9), rtol=1e-6, atol=0)
    with pytest.raises(TypeError, match="`generator` must be a torch.Generator or None, got int"):
        scheduler.set_noise_generator(0)


def test_ode_step_draws_no_noise():
    scheduler = RCMScheduler(stochastic=False)
    scheduler.set_timesteps(4)
    sample, v = torch.randn(1, 2, 1, 2, 2, dtype=torch.float64), torch.randn(1, 2, 1, 2, 2, dtype=torch.float64)
    moved = scheduler.step(v, scheduler.timesteps[0], sample).prev_sample
    assert torch.equal(moved, sample - (scheduler.sigmas[0] - scheduler.sigmas[1]) * v)


def test_step_keeps_the_sample_in_float64_between_steps():
    scheduler = RCMScheduler(stochastic=False)
    scheduler.set_timesteps(4)
    sigmas = scheduler.sigmas
    x = torch.randn(1, 2, 1, 2, 2, dtype=torch.float64)
    v = torch.randn(1, 2, 1, 2, 2, dtype=torch.float64) * 1e-3
    held = scheduler.step(v.float(), scheduler.timesteps[0], x.float(), return_dict=False)[0]
    held = scheduler.step(v.float(), scheduler.timesteps[1], held, return_dict=False)[0]
    expected = x.float().double() - (sigmas[0] - sigmas[1]) * v.float().double()
    expected = expected - (sigmas[1] - sigmas[2]) * v.float().double()
    assert held.dtype == torch.float32
    # The state went on from the float64 sample, not from the float32 copy the pipeline held.
    assert torch.equal(scheduler._state, expected)
    # A sample changed in place (e.g. by a callback) is taken as it is.
    held.mul_(2)
    moved = scheduler.step(v.float(), scheduler.timesteps[2], held, return_dict=False)[0]
    assert torch.equal(moved, (held.double() - (sigmas[2] - sigmas[3]) * v.float().double()).float())


@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "ode"])
@pytest.mark.parametrize("steps", [1, 4])
def test_t2v_pipeline_samples_turbodiffusions_recipe(t2v, steps, stochastic):
    result = t2v_sample(t2v, seed=3, steps=steps, stochastic=stochastic)
    shape = (1, 16, 2, 4, 4)
    expected = reference_sample(t2v.transformer, PROMPT_EMBEDS, shape, 3, steps, 80.0, stochastic)
    assert result.shape == shape and result.dtype == torch.float32
    torch.testing.assert_close(result, expected.float(), rtol=PIPELINE_TOL, atol=PIPELINE_TOL)
    # The tolerance tells the recipe's variants apart (one step: stochastic and ODE agree, the sigmas do not).
    for variant in ({"sigma_max": 200.0}, {"stochastic": not stochastic}) if steps > 1 else ({"sigma_max": 200.0},):
        arguments = {"steps": steps, "sigma_max": 80.0, "stochastic": stochastic, **variant}
        other = reference_sample(t2v.transformer, PROMPT_EMBEDS, shape, 3, **arguments)
        assert (result - other.float()).abs().max() > 100 * PIPELINE_TOL, variant
    # The scheduler stays on the pipeline.
    assert isinstance(t2v.scheduler, RCMScheduler) and t2v.scheduler.config.stochastic == stochastic


def test_t2v_pipeline_is_deterministic_per_seed(t2v):
    first, again, other = (t2v_sample(t2v, seed=seed, steps=2) for seed in (4, 4, 5))
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 0.1


def test_without_a_generator_torch_manual_seed_repeats_the_sample(t2v):
    def sample() -> torch.Tensor:
        torch.manual_seed(11)
        return rcm_sample(t2v, steps=2, prompt_embeds=PROMPT_EMBEDS, output_type="latent", **SIZE).frames

    first, again = sample(), sample()
    assert torch.equal(first, again) and not torch.equal(first, t2v_sample(t2v, seed=11, steps=2))


def test_latent_shape_is_the_pipelines_own(t2v):
    # 7 frames round down to 5 (4k + 1), as the pipeline does before drawing.
    size = {"height": 48, "width": 64, "num_frames": 7, "num_videos_per_prompt": 2}
    saved = t2v.scheduler
    t2v.scheduler = FlowMatchEulerDiscreteScheduler()
    own = t2v(prompt_embeds=PROMPT_EMBEDS, num_inference_steps=1, guidance_scale=1.0, output_type="latent", **size)
    t2v.scheduler = saved
    result = t2v_sample(t2v, seed=0, steps=1, **size)
    assert result.shape == own.frames.shape == (2, 16, 2, 6, 8)


def test_i2v_a14b_runs_the_high_noise_expert_above_sigma_0_9(i2v):
    import PIL.Image

    seen = {"transformer": [], "transformer_2": []}
    hooks = [
        getattr(i2v, name).register_forward_pre_hook(
            lambda module, args, kwargs, name=name: seen[name].append(float(kwargs["timestep"][0])), with_kwargs=True
        )
        for name in seen
    ]
    try:
        result = rcm_sample(
            i2v,
            image=PIL.Image.new("RGB", (32, 32), (200, 40, 40)),
            prompt_embeds=PROMPT_EMBEDS,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **SIZE,
        ).frames
    finally:
        for hook in hooks:
            hook.remove()
    timesteps = (formula_sigmas(4, 200.0)[:-1].float() * 1000).tolist()
    assert seen == {"transformer": timesteps[:2], "transformer_2": timesteps[2:]}
    assert i2v.scheduler.config.sigma_max == 200.0 and timesteps[0] == pytest.approx(1000 * 200 / 201)
    assert result.shape == (1, 16, 2, 4, 4) and torch.isfinite(result).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"guidance_scale": 5.0}, TypeError, r"rcm_sample sets `guidance_scale` itself .*without classifier-free"),
        ({"num_inference_steps": 4, "latents": None}, TypeError, r"sets `num_inference_steps`, `latents` itself"),
        ({"steps": 5}, ValueError, r"`steps` must be in 1\.\.4"),
        ({"generator": [torch.Generator()]}, TypeError, r"`generator` must be one torch.Generator or None, got list"),
        ({"prompt_embeds": None}, ValueError, r"needs `prompt` .* or `prompt_embeds`"),
    ],
)
def test_rcm_sample_rejects_bad_arguments_before_any_work(t2v, kwargs, error, match):
    saved = t2v.scheduler
    with pytest.raises(error, match=match):
        rcm_sample(t2v, **{"prompt_embeds": PROMPT_EMBEDS, **kwargs})
    assert t2v.scheduler is saved


def test_rcm_sample_takes_only_wan_pipelines():
    with pytest.raises(TypeError, match="`pipe` must be a diffusers WanPipeline or WanImageToVideoPipeline, got"):
        rcm_sample(types.SimpleNamespace(transformer=None), prompt="a cat")


def embedded_scheduler_sample(model, text: torch.Tensor, seed: int) -> torch.Tensor:
    """4 rCM steps of the embedded model driven by RCMScheduler, start and step noise from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    scheduler = RCMScheduler(sigma_max=80.0)
    scheduler.set_timesteps(4)
    noise = torch.randn((1, *embedded.LATENT_SHAPE), dtype=torch.float32, generator=generator)
    scheduler.set_noise_generator(generator)
    # A float64 start, as TurboDiffusion's: the scheduler then returns float64 samples.
    latents = noise.to(torch.float64) * scheduler.sigmas[0]
    return scheduler_loop(model, latents, text, scheduler)


@pytest.fixture(scope="module")
def embedded_sample() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(the embedded transformer, its text [1, 4, E] for one prompt, its 4-step sample [1, 12, 32, 32, 32] seed 0)."""
    model, prompts = embedded.load(embedded.WEIGHTS, "cpu")
    with torch.no_grad():
        text = prompts(["red square moves left, camera still"])
    return model, text, embedded_scheduler_sample(model, text, seed=0)


def test_embedded_model_samples_in_4_steps_exactly_as_the_reference(embedded_sample):
    model, text, result = embedded_sample
    expected = reference_sample(model, text, (1, *embedded.LATENT_SHAPE), 0, 4, 80.0)
    assert result.dtype == torch.float64 and torch.isfinite(result).all()
    assert torch.equal(result, expected)
    assert torch.equal(embedded_scheduler_sample(model, text, seed=0), result)


def test_embedded_model_patched_with_sla_samples_in_4_steps(embedded_sample):
    model, text, dense = embedded_sample
    calls = []
    sagesla.patch(model, topk=0.5, backend="torch")
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        sparse = embedded_scheduler_sample(model, text, seed=0)
    finally:
        hook.remove()
        sagesla.unpatch(model)
    assert len(calls) == 4 and torch.isfinite(sparse).all()
    # Half the key blocks dropped and an untrained proj_l: a different sample, still near the dense one.
    assert not torch.equal(sparse, dense)
    assert (sparse - dense).norm() < 0.5 * dense.norm()
