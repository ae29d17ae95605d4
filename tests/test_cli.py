"""``sagesla demo``: the video demo by default once the embedded model's weights are shipped, else the attention
demo; ``--video`` and ``--attention`` choose. The demos themselves are stubbed (tests/test_embedded.py runs them)."""

import os
import time

import pytest
import torch

import sagesla.demo
from sagesla import cli, metrics
from sagesla.embedded import demo as video_demo
from sagesla.embedded import finetuned, model


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Which demo ran, with what; the shipped files absent unless a test writes them (``tmp_path / name``)."""
    seen = []

    def video(out, **kwargs):
        seen.append(("video", kwargs))
        calibration = kwargs["calibration"] or video_demo.Calibration(target_psnr=35.0)
        return video_demo.VideoDemo([], [], kwargs["weights"] is not None, None, calibration)

    monkeypatch.setattr(sagesla.demo, "run_attention_demo", lambda *args, **kwargs: seen.append(("attention", {})))
    monkeypatch.setattr(sagesla.demo, "format_rows", lambda rows: "")
    monkeypatch.setattr(video_demo, "run_video_demo", video)
    # The command reads the weights files before the demo runs: these stand-ins accept any file.
    monkeypatch.setattr(model, "load", lambda path, device: None)
    monkeypatch.setattr(finetuned, "read", lambda path: None)
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
    assert cli.main(["demo", "--target-psnr", "30"]) == 0
    assert calls[3][1]["calibration"] == video_demo.Calibration(target_psnr=30.0)
    assert cli.main(["demo", "--budget", "0.2"]) == 0
    assert calls[4][1]["calibration"] == video_demo.Calibration(budget=0.2)
    assert cli.main(["demo", "--target-psnr", "35", "--buckets", "2"]) == 0
    assert calls[5][1]["calibration"] == video_demo.Calibration(target_psnr=35.0, buckets=2)


def test_video_demo_without_weights_says_it_uses_random_ones(calls, capsys):
    assert cli.main(["demo", "--video", "--steps", "3"]) == 0
    [(name, kwargs)] = calls
    assert name == "video" and kwargs["weights"] is None and kwargs["steps"] == 3 and kwargs["guidance"] == 1.0
    assert kwargs["calibration"] is None  # the demo's default: the shipped profile, else calibrated to 35 dB
    out = capsys.readouterr().out
    assert "SageSLA, calibrated: calibrated here to 35 dB" in out
    assert "no trained weights (scripts/train_tiny.py writes them): random weights" in out
    assert "note: random weights: these videos are noise" in out


def test_video_demo_says_when_the_calibrated_profile_runs_dense(calls, monkeypatch, capsys):
    def video(out, **kwargs):
        # A profile at topk 1.0 everywhere: every layer runs diffusers' attention, the dense videos exactly.
        identical = metrics.psnr(torch.zeros(1), torch.zeros(1))
        variant = video_demo.VariantResult(video_demo.CALIBRATED, None, 1.0, 0.0, identical, 1.0, 8, 8)
        return video_demo.VideoDemo([], [variant], True, None, video_demo.Calibration(target_psnr=35.0))

    monkeypatch.setattr(video_demo, "run_video_demo", video)
    assert cli.main(["demo", "--video"]) == 0
    out = capsys.readouterr().out
    assert "| SageSLA, calibrated | 1.0 everywhere: all 8 layers dense | 1.0     | 0.0%     | inf     |" in out
    assert (
        "note: the calibrated profile keeps every key block in 8 of 8 layers, which run diffusers' attention: "
        "'SageSLA, calibrated' is the dense model" in out
    )


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


# Every user error: one line on stderr naming the argument, exit status 2, before any long work. "{tmp}" is the
# test's folder, holding "file.txt" (not safetensors), "folder/" (empty), "bad-config/" (config.json not JSON) and
# "wide.safetensors" (a `text` of text_dim 7, which fits no model).
BAD_ARGUMENTS = [
    (["demo", "--frames", "0"], "--frames"),
    (["demo", "--frames", "-2"], "--frames"),
    (["demo", "--attention", "--heads", "0"], "--heads"),
    (["demo", "--attention", "--height", "0"], "--height"),
    (["demo", "--attention", "--width", "2.5"], "--width"),
    (["demo", "--attention", "--head-dim", "0"], "--head-dim"),
    (["demo", "--attention", "--repeats", "0"], "--repeats"),
    (["demo", "--attention", "--topk", "0.1", "0"], "--topk"),
    (["demo", "--attention", "--topk", "1.5"], "--topk"),
    (["demo", "--attention", "--topk", "nan"], "--topk"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--steps", "ten"], "--steps"),
    (["demo", "--guidance", "0.5"], "--guidance"),
    (["demo", "--guidance", "nan"], "--guidance"),
    (["demo", "--budget", "-0.1"], "--budget"),
    (["demo", "--budget", "inf"], "--budget"),
    (["demo", "--target-psnr", "0"], "--target-psnr"),
    (["demo", "--target-psnr", "nan"], "--target-psnr"),
    (["demo", "--budget", "0.1", "--target-psnr", "30"], "--target-psnr"),
    (["demo", "--video", "--buckets", "0", "--target-psnr", "35"], "--buckets"),
    (["demo", "--video", "--buckets", "2"], "--buckets"),
    (["demo", "--video", "--buckets", "3", "--steps", "2", "--budget", "0.1"], "--buckets"),
    (["demo", "--video", "--profile", "{tmp}/missing.safetensors"], "--profile"),
    (["demo", "--video", "--profile", "{tmp}/file.txt"], "--profile"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--seed", str(2**64)], "--seed"),
    (["demo", "--device", "tpu"], "--device"),
    (["demo", "--device", "cuda:x"], "--device"),
    (["demo", "--video", "--weights", "{tmp}/missing.safetensors"], "--weights"),
    (["demo", "--video", "--weights", "{tmp}/folder"], "--weights"),
    (["demo", "--video", "--weights", "{tmp}/file.txt"], "--weights"),
    (["demo", "--video", "--sla-weights", "{tmp}/missing.safetensors"], "--sla-weights"),
    (["demo", "--video", "--sla-weights", "{tmp}/file.txt"], "--sla-weights"),
    (["demo", "--video", "--out", "{tmp}/file.txt"], "--out"),
    (["demo", "--video", "--out", "{tmp}/file.txt/demo"], "--out"),
    (["calibrate", "--model", "tiny", "--budget", "0.1", "--target-sparsity", "0.5"], "--target-sparsity"),
    (["calibrate", "--model", "tiny", "--out", "{tmp}/missing/p.safetensors"], "--out"),
    (["calibrate", "--model", "tiny", "--out", "{tmp}/folder"], "--out"),
    (["calibrate", "--model", "tiny", "--out", "{tmp}/file.txt/p.safetensors"], "--out"),
    (["calibrate", "--model", "tiny", "--plot", "{tmp}/missing/p.png"], "--plot"),
    (["calibrate", "--model", "tiny", "--out", "{tmp}/p", "--plot", "{tmp}/p"], "--plot"),
    (["calibrate", "--model", "{tmp}/missing"], "--model"),
    (["calibrate", "--model", "{tmp}/folder"], "--model"),
    (["calibrate", "--model", "{tmp}/bad-config"], "--model"),
    (["calibrate", "--model", "tiny", "--inputs", "{tmp}/missing.safetensors"], "--inputs"),
    (["calibrate", "--model", "tiny", "--inputs", "{tmp}/file.txt"], "--inputs"),
    (["calibrate", "--model", "tiny", "--inputs", "{tmp}/wide.safetensors"], "--inputs"),
    (["calibrate", "--model", "tiny", "--sla-weights", "{tmp}/missing"], "--sla-weights"),
    (["calibrate", "--model", "tiny", "--prompts", "0"], "--prompts"),
    (["calibrate", "--model", "tiny", "--steps", "0"], "--steps"),
    (["calibrate", "--model", "tiny", "--steps", "nan"], "--steps"),
    (["calibrate", "--model", "tiny", "--text-len", "0"], "--text-len"),
    (["calibrate", "--model", "tiny", "--latent-shape", "4", "0", "32"], "--latent-shape"),
    (["calibrate", "--model", "tiny", "--latent-shape", "4", "31", "32"], "--latent-shape"),
    (["calibrate", "--model", "tiny", "--latent-shape", "4", "256", "32"], "--latent-shape"),
    (["calibrate", "--model", "tiny", "--buckets", "0"], "--buckets"),
    (["calibrate", "--model", "tiny", "--steps", "2", "--buckets", "3"], "--buckets"),
    (["calibrate", "--model", "tiny", "--steps", "3", "--record-steps", "0", "3"], "--record-steps"),
    (["calibrate", "--model", "tiny", "--record-steps", "-1"], "--record-steps"),
    (["calibrate", "--model", "tiny", "--shift", "0"], "--shift"),
    (["calibrate", "--model", "tiny", "--shift", "nan"], "--shift"),
    (["calibrate", "--model", "tiny", "--budget", "nan"], "--budget"),
    (["calibrate", "--model", "tiny", "--budget", "-1"], "--budget"),
    (["calibrate", "--model", "tiny", "--target-sparsity", "1"], "--target-sparsity"),
    (["calibrate", "--model", "tiny", "--target-sparsity", "-0.5"], "--target-sparsity"),
    (["calibrate", "--model", "tiny", "--topk-grid", "0", "0.5"], "--topk-grid"),
    (["calibrate", "--model", "tiny", "--topk-grid", "0.1", "1.01"], "--topk-grid"),
    (["calibrate", "--model", "tiny", "--topk-grid", "x"], "--topk-grid"),
    (["calibrate", "--model", "tiny", "--seed", "-1"], "--seed"),
    (["calibrate", "--model", "tiny", "--dtype", "float64"], "--dtype"),
    (["calibrate", "--model", "tiny", "--metric", "l2"], "--metric"),
    (["calibrate", "--model", "tiny", "--device", "mps"], "--device"),
    (["bench-e2e", "--model", "tiny", "--steps", "0"], "--steps"),
    (["bench-e2e", "--model", "tiny", "--warmup", "-1"], "--warmup"),
    (["bench-e2e", "--model", "tiny", "--nproc", "0"], "--nproc"),
    (["bench-e2e", "--model", "tiny", "--nproc", "1", "3"], "--nproc"),
    (["bench-e2e", "--model", "tiny", "--nproc", "1", "--compile"], "--nproc"),
    (["bench-e2e", "--model", "tiny", "--dense"], "--dense"),
    (["bench-e2e", "--model", "tiny", "--video", "--nproc", "1"], "--video"),
    (["bench-e2e", "--model", "tiny", "--video", "--profile", "{tmp}/file.txt"], "--video"),
    (["bench-e2e", "--model", "tiny", "--video", "--vae-repeats", "0"], "--vae-repeats"),
    (["bench-e2e", "--model", "tiny", "--out-dir", "{tmp}/file.txt"], "--out-dir"),
    (["bench-e2e", "--model", "tiny", "--profile", "{tmp}/missing.safetensors"], "--profile"),
    (["bench-e2e", "--model", "tiny", "--profile", "{tmp}/file.txt"], "--profile"),
    (["bench-e2e", "--model", "tiny", "--weights", "{tmp}/folder"], "--weights"),
]
NO_CUDA = [
    (["demo", "--device", "cuda"], "--device"),
    (["calibrate", "--model", "tiny", "--device", "cuda"], "--device"),
    (["bench-e2e", "--model", "wan2.1-1.3b"], "--model"),
]


def _case_id(case: tuple[list[str], str]) -> str:
    return "-".join(case[0][:1] + case[0][2 if case[0][0] == "calibrate" else 1 :]).replace("{tmp}/", "")


@pytest.fixture
def no_long_work(monkeypatch, tmp_path):
    """Every long step of every command fails the test if it starts; ``tmp_path`` holds the files the cases name."""
    import sagesla.calibration
    from sagesla import e2e
    from sagesla.calibration import cli as calibration_cli

    def long_work(*args, **kwargs):
        pytest.fail("the command started its long work before rejecting its arguments")

    for owner, name in (
        (calibration_cli, "load_model"),
        (sagesla.calibration, "calibrate"),
        (e2e, "build_wan"),
        (e2e, "run_scaling"),
        (e2e, "run_config"),
        (video_demo, "run_video_demo"),
        (sagesla.demo, "run_attention_demo"),
    ):
        monkeypatch.setattr(owner, name, long_work)
    monkeypatch.setattr(model, "WEIGHTS", tmp_path / "tiny-video.safetensors")
    monkeypatch.setattr(finetuned, "SLA_WEIGHTS", tmp_path / "tiny-video-sla.safetensors")
    (tmp_path / "file.txt").write_text("not a safetensors file")
    (tmp_path / "folder").mkdir()
    (tmp_path / "bad-config").mkdir()
    (tmp_path / "bad-config" / "config.json").write_text("{not json")
    from safetensors.torch import save_file

    save_file({"text": torch.zeros(1, 4, 7)}, tmp_path / "wide.safetensors")
    return tmp_path


def _rejected(argv: list[str], tmp_path, capsys, argument: str, main=cli.main) -> str:
    """Run ``argv`` (``{tmp}`` filled in): exit status 2 and one stderr line naming ``argument``; returns it."""
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exited:
        main([part.replace("{tmp}", str(tmp_path)) for part in argv])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"argument {argument}" in err and err.startswith("sagesla"), err
    assert elapsed < 1.0, f"{argv} took {elapsed:.1f} s to be rejected"
    return err


@pytest.mark.parametrize(("argv", "argument"), BAD_ARGUMENTS, ids=[_case_id(case) for case in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line_and_exit_2_before_any_long_work(no_long_work, capsys, argv, argument):
    _rejected(argv, no_long_work, capsys, argument)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(("argv", "argument"), NO_CUDA, ids=[_case_id(case) for case in NO_CUDA])
def test_cuda_requests_without_cuda_are_one_line_and_exit_2(no_long_work, capsys, argv, argument):
    assert "not available" in _rejected(argv, no_long_work, capsys, argument)


def test_the_triton_backend_on_the_cpu_is_rejected_up_front(no_long_work, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["calibrate", "--model", "tiny", "--backend", "triton", "--device", "cpu"]
    assert "needs" in _rejected(argv, no_long_work, capsys, "--backend")


def test_an_unwritable_output_folder_is_rejected_up_front(no_long_work, capsys, monkeypatch):
    monkeypatch.setattr("os.access", lambda path, mode: False)
    err = _rejected(["calibrate", "--model", "tiny", "--out", "{tmp}/p.safetensors"], no_long_work, capsys, "--out")
    assert "is not writable" in err
    _rejected(["bench-e2e", "--model", "tiny", "--out-dir", "{tmp}/new"], no_long_work, capsys, "--out-dir")


def test_the_bench_script_reports_like_the_command(no_long_work, capsys):
    from sagesla import e2e

    with pytest.raises(SystemExit) as exited:
        e2e.main(["--model", "tiny", "--nproc", "9"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.splitlines()) == 1 and "argument --nproc: [9]" in err


def test_a_weights_folder_of_another_shape_is_rejected(no_long_work, capsys):
    (no_long_work / "folder" / "config.json").write_text('{"_class_name": "WanTransformer3DModel", "text_dim": 7}')
    err = _rejected(["bench-e2e", "--model", "tiny", "--weights", "{tmp}/folder"], no_long_work, capsys, "--weights")
    assert "text_dim 7 (want 32)" in err


def test_good_arguments_reach_the_long_work(no_long_work, capsys):
    """The checks pass valid commands through: each reaches its long step (here stubbed to fail the test)."""
    for argv in (
        ["calibrate", "--model", "tiny", "--out", "{tmp}/p.safetensors", "--plot", "{tmp}/p.png", "--buckets", "2"],
        ["bench-e2e", "--model", "tiny", "--out-dir", "{tmp}/new/results", "--steps", "1", "--warmup", "0"],
        ["demo", "--attention", "--frames", "1", "--topk", "1"],
    ):
        with pytest.raises(pytest.fail.Exception, match="started its long work"):
            cli.main([part.replace("{tmp}", str(no_long_work)) for part in argv])


def test_library_user_errors_are_one_line_and_bugs_keep_their_traceback(no_long_work, capsys, monkeypatch):
    import sagesla
    from sagesla.calibration import cli as calibration_cli

    monkeypatch.setattr(calibration_cli, "load_model", lambda *args: torch.nn.Linear(1, 1))
    monkeypatch.setattr(sagesla, "patch", lambda *args, **kwargs: None)
    argv = ["calibrate", "--model", "tiny", "--out", "{tmp}/p.safetensors", "--sla-weights", "{tmp}/file.txt"]
    err = _rejected(argv, no_long_work, capsys, "--sla-weights")
    assert "no SLA layer" in err

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sagesla, "patch", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main([part.replace("{tmp}", str(no_long_work)) for part in argv])


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"steps": 0}, "`steps`"),
        ({"guidance": float("nan")}, "`guidance`"),
        ({"topk": 0.0}, "`topk`"),
        ({"prompts": ()}, "`prompts`"),
    ],
)
def test_the_video_demo_checks_its_arguments_before_building_the_model(tmp_path, monkeypatch, options, named):
    from sagesla.embedded import demo

    monkeypatch.setattr(demo, "_dense_model", lambda *args: pytest.fail("the model was built"))
    with pytest.raises(ValueError, match=named):
        video_demo.run_video_demo(tmp_path, weights=None, sla_weights=None, **options)
    with pytest.raises(NotADirectoryError, match="not a folder"):
        (tmp_path / "file").write_text("")
        video_demo.run_video_demo(tmp_path / "file", weights=None, sla_weights=None)


# -- convert-turbodiffusion -------------------------------------------------------------------------------------------

# Every user error of the command: one line naming the argument, exit status 2, before the checkpoint is read.
CONVERT_BAD_ARGUMENTS = [
    (["{tmp}/missing.pth", "{tmp}/out"], "CHECKPOINT"),
    (["{tmp}/folder", "{tmp}/out"], "CHECKPOINT"),
    (["{tmp}/file.txt", "{tmp}/out"], "CHECKPOINT"),
    (["{tmp}/file.txt", "{tmp}/file.txt"], "OUT_DIR"),
    (["{tmp}/file.txt", "{tmp}/file.txt/out"], "OUT_DIR"),
    (["{tmp}/file.txt", "{tmp}"], "OUT_DIR"),
    (["{tmp}/file.txt", "{tmp}/out", "--config", "{tmp}/missing.json"], "--config"),
    (["{tmp}/file.txt", "{tmp}/out", "--config", "{tmp}/bad-config"], "--config"),
    (["{tmp}/file.txt", "{tmp}/out", "--config", "{tmp}/folder"], "--config"),
    (["{tmp}/file.txt", "{tmp}/out", "--dtype", "float64"], "--dtype"),
]


@pytest.mark.parametrize(("argv", "argument"), CONVERT_BAD_ARGUMENTS, ids=[_case_id(c) for c in CONVERT_BAD_ARGUMENTS])
def test_convert_turbodiffusion_user_errors_are_one_line_and_exit_2(no_long_work, capsys, monkeypatch, argv, argument):
    from sagesla.patching import checkpoints

    monkeypatch.setattr(checkpoints, "read_torch_file", lambda *args: pytest.fail("the checkpoint was read"))
    _rejected(["convert-turbodiffusion", *argv], no_long_work, capsys, argument)
    assert not (no_long_work / "out").exists()


def _turbo_checkpoint(path):
    from sagesla.testing import turbodiffusion_state_dict

    config = {"num_attention_heads": 2, "attention_head_dim": 64, "in_channels": 16, "out_channels": 16}
    config |= {"text_dim": 32, "freq_dim": 32, "ffn_dim": 96, "num_layers": 2}
    torch.save(turbodiffusion_state_dict(config), path)
    return path


def test_convert_turbodiffusion_prints_the_report_and_the_next_steps(tmp_path, capsys):
    pytest.importorskip("diffusers")
    checkpoint, out = _turbo_checkpoint(tmp_path / "turbo.pth"), tmp_path / "out"
    assert cli.main(["convert-turbodiffusion", str(checkpoint), str(out), "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert f"convert_turbodiffusion: {checkpoint} -> {out}" in printed
    assert "custom WanTransformer3DModel" in printed and "torch.float32" in printed
    assert "SLA: 2 layers' proj_l in sla_weights.safetensors" in printed
    assert f'from_pretrained("{out}", torch_dtype=torch.float32)' in printed
    assert f'sagesla.load_sla_weights(model, "{out}")' in printed
    assert (out / "config.json").is_file() and (out / "sla_weights.safetensors").is_file()


def test_convert_turbodiffusion_file_errors_are_one_line(tmp_path, capsys):
    pytest.importorskip("diffusers")
    checkpoint = _turbo_checkpoint(tmp_path / "turbo.pth")
    (tmp_path / "cut.pth").write_bytes(checkpoint.read_bytes()[:1000])
    err = _rejected(["convert-turbodiffusion", "{tmp}/cut.pth", "{tmp}/out"], tmp_path, capsys, "CHECKPOINT")
    assert "cut.pth' cannot be loaded with torch.load(weights_only=True)" in err
    (tmp_path / "config.json").write_text('{"ffn_dim": 128}')
    with pytest.raises(SystemExit) as exited:
        cli.main(["convert-turbodiffusion", str(checkpoint), str(tmp_path / "out"), "--config", str(tmp_path)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "argument CHECKPOINT: config entry 'ffn_dim' is 128 but the shapes of" in err
    assert sorted(os.listdir(tmp_path)) == ["config.json", "cut.pth", "turbo.pth"]
