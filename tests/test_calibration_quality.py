"""Calibration to an output PSNR: the Lagrangian path, the binary search, the output judge, ``calibrate(...,
target_psnr=...)`` on the tiny Wan model and ``sagesla calibrate --target-psnr``."""

import dataclasses
import importlib
import itertools
import logging
import math
import sys

import pytest
import torch

import sagesla
from sagesla.profile import Measurements, Profile, load_profile
from sagesla.settings import SLASettings
from sagesla.testing import seeded_wan_inputs, synthetic_measurements

pytest.importorskip("diffusers")

from sagesla.calibration import (  # noqa: E402
    OutputJudge,
    budget_at_quality,
    calibrate,
    choose,
    choose_at_quality,
    lagrangian_path,
    output_psnr,
    sampling,
    sparsest_passing,
    summary,
)
from sagesla.calibration.quality import budget_path  # noqa: E402
from sagesla.wan_shapes import tiny_wan_transformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = SLASettings(quantized=True, block_q=128, block_k=64, backend="auto", pv_precision="fp8")
STEPS = 2
# The tiny model (random weights) at 256 tokens, 2 steps, 2 timestep buckets: its Lagrangian path measured
# 3019 (identical), 111.5, 108.3, 68.0, 65.4, ... 60.8 dB, so 66 dB lands mid-path.
TARGET = 66.0


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_wan_transformer()


def seeded_inputs(seeds, shape=(4, 16, 16)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``seeded_wan_inputs``: 256 tokens, 4 key blocks of 64 by default."""
    return seeded_wan_inputs(seeds, shape)


def measured(mean_errors: torch.Tensor, candidates=(0.25, 0.5, 1.0), edges=()) -> Measurements:
    """Synthetic measurements with mean rel-L1 ``mean_errors`` [NL, NB, NC] (worst: twice it), sparsity 1 - topk."""
    worst = (2 * mean_errors)[..., None].expand(*mean_errors.shape, 2)
    return dataclasses.replace(
        synthetic_measurements(worst, candidates, SETTINGS, edges), rel_l1_mean=mean_errors.float()
    )


def total_error(profile: Profile) -> float:
    """Mean rel-L1 at the chosen topk, summed over units weighted by observations."""
    calls = profile.measurements.calls.double()
    return float((profile.chosen("rel_l1_mean").double() * calls).sum())


# -- the Lagrangian path -----------------------------------------------------------------------------------------


def test_the_path_makes_the_cheapest_error_per_sparsity_sparse_first():
    # Candidates 0.25, 0.5, 1.0: sparsity 0.75, 0.5, 0 (values exact in float32). Layer 0 buys 0.5 sparsity for
    # 0.0625 error (lam 0.125), then 0.25 more for 0.25 (lam 1); layer 1's three points lie on one line of slope
    # 0.5: it jumps to 0.25 at once, at lam 0.5.
    errors = torch.tensor([[[0.3125, 0.0625, 0.0]], [[0.375, 0.25, 0.0]]])
    path = lagrangian_path(measured(errors))
    assert [profile.topk[:, 0].tolist() for profile in path] == [[1.0, 1.0], [0.5, 1.0], [0.5, 0.25], [0.25, 0.25]]
    assert [profile.mean_sparsity() for profile in path] == pytest.approx([0.0, 0.25, 0.625, 0.75])
    assert [total_error(profile) / 3 for profile in path] == pytest.approx([0.0, 0.0625, 0.4375, 0.6875])
    # Each profile's budget: its largest worst error (met by every observation).
    assert [profile.selection.budget for profile in path] == pytest.approx([0.0, 0.125, 0.75, 0.75])
    assert all(bool(profile.met.all()) for profile in path)
    assert torch.equal(path[1].head_topk, path[1].topk[..., None].expand(2, 1, 2))
    # The synthetic mean cosine is 1 - the mean rel-L1: the same path, by 1 - cosine.
    by_cosine = lagrangian_path(measured(errors), metric="cosine")
    assert [profile.topk.tolist() for profile in by_cosine] == [profile.topk.tolist() for profile in path]
    assert by_cosine[1].selection.metric == "cosine"


def test_the_path_ends_and_grows_as_a_lagrangian_allocation_does():
    generator = torch.Generator().manual_seed(3)
    candidates = (0.1, 0.2, 0.5, 1.0)
    errors = torch.rand(2, 2, 4, generator=generator)
    # Applied, topk 1.0 runs diffusers' attention: no error, whatever SLA measured there.
    errors[..., 3] = 0.0
    path = lagrangian_path(measured(errors, candidates, edges=(500.0,)))
    # lam = 0: each unit's least error; lam large: each unit's sparsest candidate, the smallest topk.
    assert (path[0].topk == 1.0).all() and (path[-1].topk == 0.1).all()
    assert lagrangian_path(measured(errors + 1.0, candidates, edges=(500.0,)))[0].topk.equal(path[0].topk)
    exact = errors.clone()
    exact[0, 1, 2] = 0.0
    assert lagrangian_path(measured(exact, candidates, edges=(500.0,)))[0].topk[0, 1] == 0.5
    sparsity = [profile.mean_sparsity() for profile in path]
    assert sparsity == sorted(sparsity) and len(path) > 3
    for before, after in itertools.pairwise(path):
        assert not torch.equal(before.topk, after.topk) and (after.topk <= before.topk).all()
    # No choice of candidates reaches a path profile's sparsity with less total mean error (all 4^4 choices).
    choices = torch.cartesian_prod(*[torch.arange(4)] * 4).view(-1, 2, 2)
    gathered = errors.double().gather(2, choices.permute(1, 2, 0)).sum(dim=(0, 1))
    spent = (1 - torch.tensor(candidates, dtype=torch.float64))[choices].mean(dim=(1, 2))
    for profile in path:
        reaching = spent >= profile.mean_sparsity() - 1e-12
        assert total_error(profile) / 3 <= float(gathered[reaching].min()) + 1e-9


def test_a_unit_least_wrong_at_its_sparsest_or_of_one_sparsity_never_moves():
    # No error at 0.25 (as at 1.0, which runs diffusers' attention): the sparser of the two.
    least_at_sparsest = lagrangian_path(measured(torch.tensor([[[0.0, 0.2, 0.3]]])))
    assert [profile.topk.item() for profile in least_at_sparsest] == [0.25]
    # Every candidate keeps every block (a sequence of one key block): the least error, ties to the smaller topk.
    one_sparsity = dataclasses.replace(measured(torch.tensor([[[0.1, 0.0, 0.3]]])), sparsity=torch.zeros(1, 1, 3))
    assert [profile.topk.item() for profile in lagrangian_path(one_sparsity)] == [0.5]


# -- the binary search -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 5, 8, 13])
def test_the_search_finds_the_sparsest_passing_index(count):
    for last in range(-1, count):
        called = []

        def passes(index, last=last, called=called):
            called.append(index)
            return index <= last

        found = sparsest_passing(count, passes)
        assert found == (None if last < 0 else last)
        assert len(called) <= count.bit_length() and len(set(called)) == len(called)
        # The answer was measured, never assumed; with none passing, index 0 was measured too.
        assert (found if found is not None else 0) in called


def test_the_search_rejects_an_empty_path():
    with pytest.raises(ValueError, match=r"`count` must be an int >= 1 \(the path's length\), got 0"):
        sparsest_passing(0, lambda index: True)


def sparsity_judge(top: float = 80.0):
    """A judge whose PSNR falls 40 dB per unit of mean sparsity, recording what it was asked."""
    asked = []

    def judge(profile):
        asked.append(profile)
        return top - 40 * profile.mean_sparsity()

    return judge, asked


def test_choose_at_quality_takes_the_sparsest_profile_reaching_the_target():
    errors = torch.tensor([[[0.3125, 0.0625, 0.0]], [[0.375, 0.25, 0.0]]])
    measurements = measured(errors)
    judge, asked = sparsity_judge()
    # Path sparsity 0, 0.25, 0.625, 0.75: PSNR 80, 70, 55, 50.
    profile = choose_at_quality(measurements, judge, 60.0)
    assert profile.topk[:, 0].tolist() == [0.5, 1.0] and bool(profile.met.all())
    assert profile.selection.target_psnr == 60.0 and profile.selection.output_psnr == pytest.approx(70.0)
    assert len(asked) <= 3 and any(asked_profile.topk.equal(profile.topk) for asked_profile in asked)
    # All passing: the sparsest; the target reached exactly passes.
    assert choose_at_quality(measurements, sparsity_judge()[0], 50.0).topk[:, 0].tolist() == [0.25, 0.25]


def test_choose_at_quality_returns_the_dense_most_profile_when_nothing_reaches_the_target(caplog):
    generator = torch.Generator().manual_seed(0)
    errors = torch.rand(3, 2, 3, generator=generator)
    # No error at 0.5 in one unit: the path starts below 1.0 there, and the dense-most profile leads it.
    errors[1, 0, 1] = 0.0
    measurements = measured(errors, edges=(500.0,))
    assert lagrangian_path(measurements)[0].topk[1, 0] == 0.5
    judge, asked = sparsity_judge(top=30.0)
    with caplog.at_level(logging.WARNING, logger="sagesla"):
        profile = choose_at_quality(measurements, judge, 35.0)
    assert (profile.topk == 1.0).all() and not profile.met.any() and profile.mean_sparsity() == 0
    assert profile.selection.output_psnr == pytest.approx(30.0) and asked[-1].topk.equal(profile.topk)
    assert [record.getMessage() for record in caplog.records] == [
        "sagesla: target_psnr: output PSNR 35 dB is out of reach: the largest candidate everywhere gives 30.00 dB; "
        "it is returned with met False"
    ]
    assert "measured 30.00 dB: NOT met: even the largest candidate everywhere misses it" in summary(profile)


def test_budget_at_quality_is_the_largest_budget_reaching_the_target():
    generator = torch.Generator().manual_seed(1)
    measurements = measured(torch.rand(3, 2, 3, generator=generator).sort(-1, descending=True).values, edges=(5.0,))
    judge, _ = sparsity_judge()
    found = budget_at_quality(measurements, judge, 62.0)
    path = budget_path(measurements)
    passing = [profile for profile in path if judge(profile) >= 62.0]
    assert found.met and torch.equal(found.profile.topk, passing[-1].topk)
    assert found.output_psnr == pytest.approx(80 - 40 * found.profile.mean_sparsity()) and found.output_psnr >= 62.0
    # The next budget level gives a sparser profile that misses the target.
    budget = found.profile.selection.budget
    looser = min(level for level in measurements.rel_l1_max.unique().tolist() if level > budget)
    assert judge(choose(measurements, budget=looser)) < 62.0
    assert str(found).startswith(f"per-layer budget {budget:.4g}: mean sparsity ")
    missed = budget_at_quality(measurements, judge, 90.0)
    assert not missed.met and (missed.profile.topk == 1.0).all() and missed.output_psnr == 80.0


def test_judging_shows_a_progress_counter(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    errors = torch.tensor([[[0.3125, 0.0625, 0.0]], [[0.375, 0.25, 0.0]]])
    choose_at_quality(measured(errors), sparsity_judge()[0], 60.0, progress=True)
    # 4 profiles: at most 3 judged; this search judged 2 (index 1 passes, index 2 fails).
    assert capsys.readouterr().err == "\rjudging: 1/3 profiles\rjudging: 2/3 profiles\n"


# -- on the tiny model -------------------------------------------------------------------------------------------


def psnr_by_hand(samples, dense) -> float:
    """Mean over batch rows of 10 log10((max - min of the dense row)^2 / MSE), in float64."""
    values = []
    for sample, reference in zip(samples, dense, strict=True):
        for row, dense_row in zip(sample.double(), reference.double(), strict=True):
            mse = float((row - dense_row).square().mean())
            values.append(10 * math.log10(float(dense_row.max() - dense_row.min()) ** 2 / mse))
    return sum(values) / len(values)


def sampled_with(profile, inputs) -> list[torch.Tensor]:
    """Final latents of a fresh tiny model patched by ``profile``."""
    model = tiny_model()
    sagesla.patch(model, profile=profile)
    return [sampling.denoise(model, latents, text, STEPS) for latents, text in inputs]


def test_calibrate_to_a_target_psnr_gives_what_patch_then_samples():
    inputs = seeded_inputs([0, 1])
    profile = calibrate(tiny_model(), inputs, steps=STEPS, buckets=2, target_psnr=TARGET, progress=False)
    assert profile.selection.target_psnr == TARGET and bool(profile.met.all())
    unpatched = tiny_model()
    dense = [sampling.denoise(unpatched, latents, text, STEPS) for latents, text in inputs]
    recomputed = psnr_by_hand(sampled_with(profile, inputs), dense)
    assert recomputed == pytest.approx(profile.selection.output_psnr, rel=1e-9) and recomputed >= TARGET
    # The sparsest such profile: the next one of the path misses the target.
    path = lagrangian_path(profile.measurements)
    index = next(i for i, candidate in enumerate(path) if torch.equal(candidate.topk, profile.topk))
    assert 0 < index < len(path) - 1 and profile.mean_sparsity() > 0
    assert psnr_by_hand(sampled_with(path[index + 1], inputs), dense) < TARGET
    text = summary(profile)
    assert f"target: output PSNR >= {TARGET:g} dB" in text and f"{profile.selection.output_psnr:.2f} dB: met" in text
    assert "budget met" not in text and f"mean sparsity {profile.mean_sparsity():.2%}" in text


def test_an_unreachable_target_returns_topk_one_everywhere_and_does_not_raise(caplog):
    with caplog.at_level(logging.WARNING, logger="sagesla"):
        profile = calibrate(tiny_model(), seeded_inputs([0]), steps=1, target_psnr=1e4, progress=False)
    assert (profile.topk == 1.0).all() and not profile.met.any()
    # Every layer runs diffusers' attention: the output is the dense one, whose PSNR metrics.psnr keeps finite.
    assert 1000 < profile.selection.output_psnr < 1e4
    assert "output PSNR 10000 dB is out of reach" in caplog.text


def test_the_judge_measures_the_output_and_leaves_the_processors_as_they_were():
    inputs = seeded_inputs([2])
    model = tiny_model()
    sagesla.patch(model, topk=0.5)
    processors = [block.attn1.processor for block in model.blocks]
    judge = OutputJudge(model, inputs, steps=STEPS)
    profile = choose(calibrate(tiny_model(), inputs, steps=STEPS, progress=False).measurements, budget=1.0)
    samples = judge.sample(profile.layer_topk(), ())
    assert judge(profile) == pytest.approx(psnr_by_hand(samples, judge.dense), rel=1e-12)
    assert judge(profile) == output_psnr(samples, judge.dense)
    assert all(p.bucket_topk is None and p.timesteps is None for p in processors) and not model._forward_pre_hooks
    # The model runs its own topk again.
    assert [block.attn1.sla.topk for block in model.blocks] == [0.5, 0.5]


def squashed(latents: torch.Tensor) -> torch.Tensor:
    """A stand-in decode: latents [B, C, F, H, W] -> [B, 3, F, H, W] in [-1, 1]."""
    return latents[:, :3].tanh()


def test_a_judge_with_decode_measures_the_videos_at_range_two():
    inputs = seeded_inputs([0, 1])
    model = tiny_model()
    sagesla.patch(model, topk=1.0)
    judge = OutputJudge(model, inputs, steps=STEPS, decode=squashed)
    assert judge.judged_on == "videos" and OutputJudge(model, inputs, steps=STEPS).judged_on == "latents"
    profile = choose(calibrate(tiny_model(), inputs, steps=STEPS, progress=False).measurements, budget=1.0)
    latents = judge.sample(profile.layer_topk(), ())
    dense = [squashed(d) for d in OutputJudge(model, inputs, steps=STEPS).dense]
    by_hand = []
    for sample, reference in zip(latents, dense, strict=True):
        for row, dense_row in zip(squashed(sample).double(), reference.double(), strict=True):
            by_hand.append(10 * math.log10(4.0 / float((row - dense_row).square().mean())))
    assert judge(profile) == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-12)
    # Not the latents' PSNR: that one takes each dense row's own range.
    assert abs(judge(profile) - output_psnr(latents, OutputJudge(model, inputs, steps=STEPS).dense)) > 0.1


def test_calibrate_with_decode_records_a_video_judged_profile():
    inputs = seeded_inputs([0, 1])
    profile = calibrate(
        tiny_model(), inputs, steps=STEPS, buckets=2, target_psnr=TARGET, decode=squashed, progress=False
    )
    assert profile.selection.judged_on == "videos" and "(decoded videos against the dense model's" in summary(profile)
    unpatched = tiny_model()
    dense = [squashed(sampling.denoise(unpatched, latents, text, STEPS)) for latents, text in inputs]
    videos = [squashed(latents) for latents in sampled_with(profile, inputs)]
    assert output_psnr(videos, dense, data_range=2.0) == pytest.approx(profile.selection.output_psnr, rel=1e-9)
    latent_judged = calibrate(tiny_model(), inputs, steps=STEPS, target_psnr=TARGET, progress=False)
    assert latent_judged.selection.judged_on == "latents" and "(final latents against" in summary(latent_judged)


def test_the_judge_refuses_what_it_cannot_measure():
    inputs = seeded_inputs([0])
    with pytest.raises(ValueError, match=r"`model` has no SLA layer: sagesla.patch it first"):
        OutputJudge(tiny_model(), inputs, steps=1)
    model = tiny_model()
    sagesla.patch(model, topk=1.0)
    with pytest.raises(ValueError, match=r"`dense\[0\]`: the dense final latents must be finite and not constant"):
        OutputJudge(model, inputs, steps=1, dense=[torch.zeros(1, 16, 4, 16, 16)])
    with pytest.raises(ValueError, match=r"`dense` must hold one final latent per input \(1\), got 2"):
        OutputJudge(model, inputs, steps=1, dense=[torch.randn(1, 16, 4, 16, 16)] * 2)
    judge = OutputJudge(model, inputs, steps=1)
    other = measured(torch.rand(3, 1, 3))
    with pytest.raises(ValueError, match=r"only in the profile \['blocks.2.attn1'\], only in the model \[\]"):
        judge(choose(other, budget=1.0))


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"target_psnr": "35"}, TypeError, r"`target_psnr` must be a finite float > 0 \(dB\), got str '35'"),
        ({"target_psnr": True}, TypeError, r"`target_psnr` must be a finite float > 0 \(dB\), got bool True"),
        ({"target_psnr": 0.0}, ValueError, r"`target_psnr` must be a finite float > 0 \(dB\), got 0.0"),
        ({"target_psnr": -3}, ValueError, r"`target_psnr` must be a finite float > 0 \(dB\), got -3"),
        ({"target_psnr": math.nan}, ValueError, r"`target_psnr` must be a finite float > 0 \(dB\), got nan"),
        ({"target_psnr": math.inf}, ValueError, r"`target_psnr` must be a finite float > 0 \(dB\), got inf"),
        (
            {"target_psnr": 35.0, "target_sparsity": 0.5},
            ValueError,
            r"give `target_psnr` or `target_sparsity`, not both: got target_psnr 35.0 and target_sparsity 0.5",
        ),
        ({"target_psnr": 35.0, "per_head": True}, ValueError, r"leave `per_head` False, got True"),
        ({"target_psnr": 35.0, "metric": "l2"}, ValueError, r"`metric` must be one of \('rel_l1', 'cosine'\)"),
        ({"target_psnr": 35.0, "decode": "vae"}, TypeError, r"`decode` must be a callable .* or None, got 'vae'"),
        ({"decode": squashed}, ValueError, r"`decode` serves the output PSNR: give it with `target_psnr`"),
        ({"target_psnr": 35.0, "judged_on": "pixels"}, ValueError, r"`judged_on` must be one of \('latents', 'vid"),
    ],
    ids=[
        "str",
        "bool",
        "zero",
        "negative",
        "nan",
        "inf",
        "with-target-sparsity",
        "per-head",
        "metric",
        "decode-not-callable",
        "decode-alone",
        "judged-on",
    ],
)
def test_bad_quality_arguments_raise_before_any_run(monkeypatch, kwargs, error, message):
    def no_run(*args, **kwargs):
        pytest.fail("calibrate started its run before rejecting its arguments")

    # The package's `calibrate` is the function; the module holds the names it runs.
    monkeypatch.setattr(importlib.import_module("sagesla.calibration.calibrate"), "Recording", no_run)
    if "judged_on" not in kwargs:  # calibrate takes it from its judge
        with pytest.raises(error, match=message):
            calibrate(tiny_model(), seeded_inputs([0]), steps=1, progress=False, **kwargs)
    choose_kwargs = {k: v for k, v in kwargs.items() if k in ("target_psnr", "metric", "judged_on")}
    if len(choose_kwargs) == len(kwargs):
        with pytest.raises(error, match=message):
            choose_at_quality(measured(torch.rand(2, 1, 3)), no_run, **choose_kwargs)


# -- command line ------------------------------------------------------------------------------------------------


def test_cli_target_psnr_writes_the_measured_profile(tmp_path, capsys):
    from sagesla.cli import main

    out = tmp_path / "tiny.safetensors"
    argv = ["calibrate", "--model", "tiny", "--steps", "2", "--latent-shape", "4", "16", "16", "--buckets", "2"]
    assert main([*argv, "--target-psnr", "66", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    profile = load_profile(out)
    assert profile.selection.target_psnr == 66.0 and bool(profile.met.all())
    assert f"measured {profile.selection.output_psnr:.2f} dB: met" in printed
    assert f"mean sparsity {profile.mean_sparsity():.2%} over" in printed and profile.mean_sparsity() > 0


@pytest.mark.parametrize(
    "extra,argument",
    [
        (["--target-psnr", "0"], "--target-psnr"),
        (["--target-psnr", "nan"], "--target-psnr"),
        (["--target-psnr", "inf"], "--target-psnr"),
        (["--target-psnr", "high"], "--target-psnr"),
        (["--budget", "0.1", "--target-psnr", "30"], "--target-psnr"),
        (["--target-sparsity", "0.5", "--target-psnr", "30"], "--target-psnr"),
        (["--target-psnr", "30", "--per-head"], "--per-head"),
    ],
    ids=["zero", "nan", "inf", "word", "with-budget", "with-target-sparsity", "per-head"],
)
def test_cli_target_psnr_errors_are_one_line_before_the_model_loads(monkeypatch, tmp_path, capsys, extra, argument):
    from sagesla.calibration import cli as calibration_cli
    from sagesla.cli import main

    monkeypatch.setattr(calibration_cli, "load_model", lambda *args: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as exited:
        main(["calibrate", "--model", "tiny", "--out", str(tmp_path / "p.safetensors"), *extra])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.splitlines()) == 1 and f"argument {argument}" in err, err
