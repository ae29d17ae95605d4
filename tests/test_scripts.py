"""The benchmark scripts run end to end in their CPU smoke modes and write their result files."""

import json
import pathlib
import runpy
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


def test_bench_e2e_tiny_writes_results(tmp_path, monkeypatch, capsys):
    from sagesla.calibration import calibrate
    from sagesla.wan_shapes import tiny_wan_transformer

    inputs = [(torch.randn(1, 16, 4, 16, 16), torch.randn(1, 8, 32))]
    calibrate(tiny_wan_transformer(), inputs, steps=2, budget=0.3, progress=False).save(tmp_path / "tiny.profile")
    argv = ["bench_e2e.py", "--model", "tiny", "--steps", "1", "--profile", str(tmp_path / "tiny.profile")]
    monkeypatch.setattr(sys, "argv", [*argv, "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_status:
        runpy.run_path(str(SCRIPTS / "bench_e2e.py"), run_name="__main__")
    assert exit_status.value.code == 0
    report = json.loads((tmp_path / "CPU-e2e-tiny.json").read_text())
    labels = [r["config"] for r in report["results"]]
    assert labels == [
        "dense SDPA (default backend)",
        "SageSLA topk 0.05",
        "SageSLA topk 0.1",
        "SageSLA profile tiny.profile",
        "SLA unquantized topk 0.05",
    ]
    assert all(r["step_ms"] > 0 and 0 < r["attention_share"] <= 1 for r in report["results"])
    assert report["results"][0]["speedup"] == 1.0 and report["tokens"] == 256
    assert "| SageSLA topk 0.05" in capsys.readouterr().out


def test_bench_e2e_video_tiny_writes_results(tmp_path, monkeypatch):
    """The whole-video run: each recipe's video time adds up its parts; quantized rows run on quantized layers."""
    argv = ["bench_e2e.py", "--video", "--model", "tiny", "--steps", "1", "--warmup", "0", "--vae-repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_status:
        runpy.run_path(str(SCRIPTS / "bench_e2e.py"), run_name="__main__")
    assert exit_status.value.code == 0
    report = json.loads((tmp_path / "CPU-e2e-video-tiny.json").read_text())
    videos = report["videos"]
    assert [(r["steps"], r["forwards_per_step"]) for r in videos] == [(50, 2), (4, 1), (4, 1)]
    assert "quantized linear" in videos[2]["recipe"] and "quantized" not in videos[1]["recipe"]
    for row in videos:
        encoder = row["text_encoder_s"] or 0.0
        assert row["transformer_s"] == pytest.approx(row["steps"] * row["step_ms"] / 1e3)
        assert row["video_s"] == pytest.approx(row["transformer_s"] + encoder + row["vae_decode_s"])
        assert row["speedup"] == pytest.approx(videos[0]["video_s"] / row["video_s"])
    assert [r["option"] for r in report["vae_decode"]] == ["float32", "bfloat16", "bfloat16, tiling"]
    assert videos[0]["vae_decode_s"] == report["vae_decode"][0]["decode_s"] > 0


def test_bench_e2e_ulysses_scaling_on_cpu_ranks(tmp_path):
    # Spawned workers import the script by path, so it runs as a process (gloo ranks on the CPU).
    command = [sys.executable, str(SCRIPTS / "bench_e2e.py"), "--model", "tiny", "--nproc", "2", "1", "--dense"]
    subprocess.run([*command, "--steps", "1", "--out-dir", str(tmp_path)], check=True, capture_output=True)
    report = json.loads((tmp_path / "CPU-e2e-tiny-ulysses.json").read_text())
    rows = [(r["config"], r["gpus"]) for r in report["results"]]
    assert rows == [(c, n) for n in (1, 2) for c in ("SageSLA topk 0.05", "dense SDPA (default backend)")]
    assert all(r["step_ms"] > 0 for r in report["results"])
    assert [r["speedup"] for r in report["results"][:2]] == [1.0, 1.0] and "gloo" in report["parallelism"]


def test_patch_wan_check_tiny(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["patch_wan_check.py", "--tiny", "--repeats", "1"])
    runpy.run_path(str(SCRIPTS / "patch_wan_check.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "replaced 2" in out and "last call of 2 layer(s): SLA, sparsity 0.750" in out


def test_bench_attention_pv_auto_summary_counts_the_faster_precision():
    bench = runpy.run_path(str(SCRIPTS / "bench_attention.py"), run_name="bench_attention")
    row = bench["Row"]
    stages = [
        {"shape": "A", "topk": 0.05, "pv": "fp8", "total": 0.86},
        {"shape": "A", "topk": 0.05, "pv": "half", "total": 0.98},
        {"shape": "B", "topk": 0.05, "pv": "fp8", "total": 2.5},
        {"shape": "B", "topk": 0.05, "pv": "half", "total": 2.4},
    ]
    rows = [
        row("A", 0.05, "SageSLA ours (P.V fp8)", 0.86, 1.0, 1.0, 0.036, 0.999),
        row("A", 0.05, "SageSLA ours (P.V half)", 0.98, 1.0, 1.0, 0.0125, 0.9999),
        row("B", 0.05, "SageSLA ours (P.V fp8)", 2.5, 1.0, 1.0),
    ]
    summary = bench["pv_auto_summary"](stages, rows, "fp8")
    assert summary == {
        "auto": "fp8",
        "points": 2,
        "faster": {"fp8": 1, "half": 1},
        "rel_l1": {"fp8": [0.036, 0.036], "half": [0.0125, 0.0125]},
    }
    line = bench["pv_auto_line"](summary)
    assert "takes fp8" in line and "fp8 at 1, half at 1 of 2" in line and "does NOT agree" in line
    stages[3]["total"] = 2.6
    assert "(agrees with every point)" in bench["pv_auto_line"](bench["pv_auto_summary"](stages, rows, "fp8"))


def test_bench_attention_reference_sagesla_row_only_when_installed(monkeypatch):
    import importlib.machinery
    import types

    bench = runpy.run_path(str(SCRIPTS / "bench_attention.py"), run_name="bench_attention")
    proj = (torch.randn(8, 8), torch.randn(8))
    assert bench["reference_sagesla"](8, 0.05, proj) is None  # neither package is installed here

    class FakeSageSLA(torch.nn.Module):
        def __init__(self, head_dim, topk, feature_map="softmax", use_bf16=True, tie_feature_map_qk=True):
            super().__init__()
            self.args = (head_dim, topk, feature_map)
            self.proj_l = torch.nn.Linear(head_dim, head_dim)

    for name in ("spas_sage_attn", "SageSLA"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["SageSLA"].SageSparseLinearAttention = FakeSageSLA
    peer = bench["reference_sagesla"](8, 0.05, proj)
    assert peer.args == (8, 0.05, "softmax")
    assert torch.equal(peer.proj_l.weight, proj[0]) and torch.equal(peer.proj_l.bias, proj[1])


def test_bench_linear_branch_smoke_writes_results(tmp_path, monkeypatch):
    """The linear-branch benchmark's CPU smoke run, then a second one compared with the first."""
    script = str(SCRIPTS / "bench_linear_branch.py")
    monkeypatch.setattr(sys, "argv", ["bench_linear_branch.py", "--smoke", "--label", "a", "--out-dir", str(tmp_path)])
    runpy.run_path(script, run_name="__main__")
    first = tmp_path / "CPU-linear-branch-a.json"
    argv = ["bench_linear_branch.py", "--smoke", "--compare", str(first), "--out-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(script, run_name="__main__")
    rows = json.loads((tmp_path / "CPU-linear-branch.json").read_text())["rows"]
    assert [row["case"] for row in rows] == [
        "SageSLA forward, proj_l trained",
        "SageSLA forward, proj_l zero",
        "SLA forward+backward, scope complement, topk 0.05",
        "SLA forward+backward, scope complement, topk 0.9",
    ]
    assert all(row["eager_ms"] > 0 and row["other_eager_ms"] > 0 and row["eager_ratio"] > 0 for row in rows)


def test_bench_families_smoke_writes_results(tmp_path, monkeypatch):
    """The model-family benchmark's CPU smoke run: a dense row and one per topk for each tiny model, every patched
    layer served by SLA."""
    argv = ["bench_families.py", "--smoke", "--family", "ltx-video", "--out-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPTS / "bench_families.py"), run_name="__main__")
    rows = json.loads((tmp_path / "CPU-families.json").read_text())["rows"]
    assert [(row["attention"], row["topk"]) for row in rows] == [
        ("dense", None),
        ("SageSLA (2 layers)", 0.05),
        ("SageSLA (2 layers)", 0.1),
    ]
    assert all(row["ms"] > 0 for row in rows) and all(row["sparsity"] > 0.5 for row in rows[1:])


def test_bench_families_refuses_an_unknown_family(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_families.py", "--smoke", "--family", "flux"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPTS / "bench_families.py"), run_name="__main__")
    assert exit_.value.code == 2 and "--family: unknown ['flux']" in capsys.readouterr().err


def test_quantized_linear_quality_cpu_writes_results(tmp_path, monkeypatch):
    """The quantized-linear quality script on CPU, one prompt, one step: int8 rows close to their exact twins, the
    fp8 ones not run (no FP8 GPU), with why."""
    pytest.importorskip("torchao")
    argv = ["quantized_linear_quality.py", "--steps", "1", "--prompt", "red circle moves right, camera still"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out-dir", str(tmp_path)])
    runpy.run_path(str(SCRIPTS / "quantized_linear_quality.py"), run_name="__main__")
    report = json.loads((tmp_path / "CPU-quantized-linear.json").read_text())
    variants = ["dense", "int8", "SageSLA topk 0.5", "SageSLA topk 0.5 + int8"]
    assert [row["variant"] for row in report["rows"]] == variants
    assert [v["quantized_layers"] for v in report["variants"]] == [0, 60, 0, 60]
    assert all(row["psnr_vs_exact_db"] > 40 for row in report["rows"])
    assert sorted(report["not_run"]) == ["SageSLA topk 0.5 + fp8", "fp8"]
    assert all("is on cpu" in why for why in report["not_run"].values())


@pytest.mark.parametrize("goal", [[], ["--target-psnr", "40"]], ids=["budget", "target-psnr"])
def test_calibrate_wan_check_tiny_times_a_calibration_and_writes_its_profile(tmp_path, monkeypatch, capsys, goal):
    from sagesla.profile import load_profile

    out = tmp_path / "tiny.profile"
    argv = ["calibrate_wan_check.py", "--tiny", "--prompts", "1", "--steps", "2", "--budget", "0.3", *goal]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    runpy.run_path(str(SCRIPTS / "calibrate_wan_check.py"), run_name="__main__")
    printed = capsys.readouterr().out
    selection = load_profile(out).selection
    assert "calibration:" in printed and "candidate evaluation:" in printed
    if goal:
        assert selection.target_psnr == 40 and selection.output_psnr >= 40
        assert f"output PSNR:          {selection.output_psnr:8.2f} dB (asked 40)" in printed
    else:
        assert selection.budget == 0.3 and selection.target_psnr is None and "output PSNR" not in printed
