"""Result files: atomic writes, provenance headers, markdown tables."""

import json

import pytest

from sagesla.tables import markdown_table, run_header, write_report, write_text_atomic


def test_write_text_atomic_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    write_text_atomic(path, "new text")
    assert path.read_text() == "new text" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_write_text_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("old")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_write_report_writes_header_and_payload(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGESLA_GIT_SHA", "abc1234")
    header = run_header("NVIDIA H100", command="bench")
    write_report(tmp_path / "H100-e2e-wan2.1-1.3b", header, {"rows": [1, 2]}, markdown_table(["a", "b"], [[1, 22]]))
    report = json.loads((tmp_path / "H100-e2e-wan2.1-1.3b.json").read_text())
    assert (report["gpu"], report["git"], report["command"], report["rows"]) == (
        "NVIDIA H100",
        "abc1234",
        "bench",
        [1, 2],
    )
    assert {"torch", "triton", "date"} <= report.keys()
    md = (tmp_path / "H100-e2e-wan2.1-1.3b.md").read_text().splitlines()
    assert md[:2] == ["- gpu: NVIDIA H100", "- torch: " + report["torch"]]
    assert md[-3:] == ["| a | b  |", "|---|----|", "| 1 | 22 |"]
