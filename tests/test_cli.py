"""``sagesla demo``: the video demo by default once the embedded model's weights are shipped, else the attention
demo; ``--video`` and ``--attention`` choose. The demos themselves are stubbed (tests/test_embedded.py runs them)."""

import pytest

from sagesla import cli
from sagesla.embedded import demo as video_demo
from sagesla.embedded import finetuned, model


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Which demo ran, with what; the shipped files absent unless a test writes them (``tmp_path / name``)."""
    import sagesla.demo

    seen = []

    def video(out, **kwargs):
        seen.append(("video", kwargs))
        return video_demo.VideoDemo([], [], kwargs["weights"] is not None, None)

    monkeypatch.setattr(sagesla.demo, "run_attention_demo", lambda *args, **kwargs: seen.append(("attention", {})))
    monkeypatch.setattr(sagesla.demo, "format_rows", lambda rows: "")
    monkeypatch.setattr(video_demo, "run_video_demo", video)
    monkeypatch.setattr(model, "WEIGHTS", tmp_path / "tiny-video.safetensors")
    monkeypatch.setattr(finetuned, "SLA_WEIGHTS", tmp_path / "tiny-video-sla.safetensors")
    return seen


def test_demo_runs_the_attention_demo_while_no_weights_are_shipped(calls, capsys):
    assert cli.main(["demo"]) == 0
    assert [name for name, _ in calls] == ["attention"]
    assert "no trained video model" in capsys.readouterr().out


def test_demo_runs_the_video_demo_once_weights_are_shipped(calls, capsys):
    model.WEIGHTS.write_bytes(b"")
    assert cli.main(["demo", "--out", "x"]) == 0
    [(name, kwargs)] = calls
    assert name == "video" and kwargs["weights"] == model.WEIGHTS and kwargs["sla_weights"] is None
    assert "no fine-tune file (scripts/finetune_tiny.py writes it)" in capsys.readouterr().out
    finetuned.SLA_WEIGHTS.write_bytes(b"")
    assert cli.main(["demo"]) == 0 and calls[1][1]["sla_weights"] == finetuned.SLA_WEIGHTS
    assert cli.main(["demo", "--attention"]) == 0 and calls[2][0] == "attention"


def test_video_demo_without_weights_says_it_uses_random_ones(calls, capsys):
    assert cli.main(["demo", "--video", "--steps", "3"]) == 0
    [(name, kwargs)] = calls
    assert name == "video" and kwargs["weights"] is None and kwargs["steps"] == 3 and kwargs["guidance"] == 1.0
    out = capsys.readouterr().out
    assert "no trained weights (scripts/train_tiny.py writes them): random weights" in out
    assert "note: random weights: these videos are noise" in out


def test_video_and_attention_exclude_each_other(calls, capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--video", "--attention"])
    assert "not allowed with argument" in capsys.readouterr().err and calls == []


def test_bench_e2e_is_a_subcommand_with_the_scripts_arguments(monkeypatch, capsys):
    from sagesla import e2e

    seen = []
    monkeypatch.setattr(e2e, "run_scaling", lambda args, gpu, backend: seen.append((args.model, args.nproc, backend)))
    assert cli.main(["bench-e2e", "--model", "tiny", "--nproc", "1", "2", "--steps", "1"]) == 0
    assert seen == [("tiny", [1, 2], "gloo")]  # no GPU here: gloo processes on the CPU
    with pytest.raises(SystemExit, match=r"--nproc \[3\]: each count must be in \[1, 2\]"):
        cli.main(["bench-e2e", "--model", "tiny", "--nproc", "3"])
