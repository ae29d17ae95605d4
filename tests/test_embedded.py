"""The embedded video model's data (procedural moving shapes) and its training script's smoke mode."""

import json
import pathlib
import runpy
import sys

import pytest
import torch
from safetensors import safe_open

from sagesla.embedded.videos import BACKGROUND, DIRECTIONS, PROMPTS, centroid, from_latent, render, to_latent, tokenize


def test_every_prompt_moves_its_shape_the_prompted_way():
    video = render(list(PROMPTS), generator=torch.Generator().manual_seed(0))
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
