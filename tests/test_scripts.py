"""The benchmark scripts run end to end in their CPU smoke modes and write their result files."""

import json
import pathlib
import runpy
import sys

import pytest

pytest.importorskip("diffusers")
SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


def test_bench_e2e_tiny_writes_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_e2e.py", "--model", "tiny", "--steps", "1", "--out-dir", str(tmp_path)])
    runpy.run_path(str(SCRIPTS / "bench_e2e.py"), run_name="__main__")
    report = json.loads((tmp_path / "CPU-e2e.json").read_text())
    labels = [r["config"] for r in report["results"]]
    assert labels == [
        "dense SDPA (default backend)",
        "SageSLA topk 0.05",
        "SageSLA topk 0.1",
        "SLA unquantized topk 0.05",
    ]
    assert all(r["step_ms"] > 0 and 0 < r["attention_share"] <= 1 for r in report["results"])
    assert report["results"][0]["speedup"] == 1.0 and report["tokens"] == 256
    assert "| SageSLA topk 0.05" in capsys.readouterr().out


def test_patch_wan_check_tiny(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["patch_wan_check.py", "--tiny", "--repeats", "1"])
    runpy.run_path(str(SCRIPTS / "patch_wan_check.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "replaced 2" in out and "last call of 2 layer(s): SLA, sparsity 0.750" in out
