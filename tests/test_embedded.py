"""The embedded video model's data (procedural moving shapes) and its training script's smoke mode."""

import json
import pathlib
import runpy
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sagesla import metrics
from sagesla.embedded.videos import BACKGROUND, DIRECTIONS, PROMPTS, centroid, from_latent, render, to_latent, tokenize


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_every_prompt_moves_its_shape_the_prompted_way(device):
    video = render(list(PROMPTS), generator=torch.Generator(device).manual_seed(0), device=device).cpu()
    assert video.shape == (len(PROMPTS), 3, 16, 32, 32) and video.min() >= -1 and video.max() <= 1
    travel = centroid(video)[:, -1] - centroid(video)[:, 0]  # [N, 2] rows, columns
    for prompt, moved in zip(PROMPTS, travel, strict=True):
        along = torch.tensor(DIRECTIONS[prompt.split()[3]])
        assert float(moved @ along) > 0.3 * 32, prompt  # crosses at least 30 % of the frame that way
        assert float((moved - (moved @ along) * along).abs().max()) < 0.5, prompt  # and not sideways


def test_colour_and_shape_follow_the_prompt():
    video = render(["red square moves left", "blue circle moves left"], generator=torch.Generator().manual_seed(1))
    frames = video[:, :, 0]  # [2, 3, S, S], first frame
    lit = frames.mean(dim=1) > BACKGROUND + 0.3  # [2, S, S]
    red, blue = frames[0][:, lit[0]], frames[1][:, lit[1]]  # [3, pixels]
    assert red[0].mean() > 0.8 and red[2].mean() < -0.4 and blue[2].mean() > 0.8 and blue[0].mean() < -0.4
    # a square fills its bounding box; a circle about pi / 4 of it
    box = [int(m.any(0).sum() * m.any(1).sum()) for m in lit]
    fill = [int(m.sum()) / b for m, b in zip(lit, box, strict=True)]
    assert fill[0] > 0.95 and 0.65 < fill[1] < 0.9, fill


def test_latent_round_trip_is_exact():
    video = render(["green circle moves up"] * 2, generator=torch.Generator().manual_seed(2))
    latent = to_latent(video)
    assert latent.shape == (2, 12, 16, 16, 16) and torch.equal(from_latent(latent), video)


def test_unknown_prompt_raises_naming_it():
    with pytest.raises(ValueError, match="'purple circle moves left'"):
        tokenize(["purple circle moves left"])


def test_train_tiny_smoke(tmp_path, monkeypatch, capsys):
    pytest.importorskip("diffusers")
    out = tmp_path / "tiny.safetensors"
    monkeypatch.setattr(sys, "argv", ["train_tiny.py", "--smoke", "--out", str(out)])
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "train_tiny.py"
    runpy.run_path(str(script), run_name="__main__")
    with safe_open(out, "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert "prompts.words.weight" in keys and any(k.startswith("transformer.blocks.1.") for k in keys)
    assert json.loads(metadata["config"])["num_layers"] == 2 and float(metadata["final_loss"]) > 0
    assert "4 steps" in capsys.readouterr().out


def test_ssim_and_psnr_match_their_definitions():
    """SSIM equals scikit-image's (gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=2):
    0.8846067879568205 on these numpy draws, computed with scikit-image once; PSNR of noise std 0.1 is 26.0 dB."""
    rng = np.random.default_rng(0)
    x = rng.random((32, 32)) * 2 - 1
    y = x + 0.1 * rng.standard_normal((32, 32))
    assert metrics.ssim(torch.from_numpy(y), torch.from_numpy(x)) == pytest.approx(0.8846067879568205, abs=1e-12)
    assert metrics.ssim(torch.from_numpy(x), torch.from_numpy(x)) == pytest.approx(1.0)
    psnr = metrics.psnr(torch.from_numpy(y), torch.from_numpy(x))
    assert psnr == pytest.approx(10 * np.log10(4 / np.mean((y - x) ** 2)))


def test_video_demo_writes_its_outputs(tmp_path):
    pytest.importorskip("diffusers")
    from PIL import Image

    from sagesla.embedded.demo import format_results, run_video_demo
    from sagesla.embedded.model import TINY_VIDEO_CONFIG

    config = {**TINY_VIDEO_CONFIG, "num_layers": 2}
    prompts = ("red circle moves right", "blue square moves up")
    results, trained = run_video_demo(tmp_path, prompts=prompts, steps=2, config=config, progress=False)
    assert not trained and [r.prompt for r in results] == list(prompts)
    assert all(r.dense_ms_per_step > 0 and r.psnr_db > 0 and -1 <= r.ssim <= 1 for r in results)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["results"][1]["prompt"] == prompts[1] and report["trained_weights"] is False
    gif = Image.open(tmp_path / "demo.gif")
    assert gif.n_frames == 16 * len(prompts) and gif.size == ((32 * 2 + 2) * 4, 32 * 4)
    assert (tmp_path / "profile.png").is_file() and (tmp_path / "profile.safetensors").is_file()
    assert "| red circle moves right" in format_results(results)


def test_load_rejects_a_missing_weights_file(tmp_path):
    pytest.importorskip("diffusers")
    from sagesla.embedded.demo import load

    with pytest.raises(FileNotFoundError, match="scripts/train_tiny.py"):
        load(tmp_path / "nope.safetensors", "cpu")
