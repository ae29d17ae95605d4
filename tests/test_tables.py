"""Result files: provenance headers, markdown tables."""

import json

import pytest

from sagesla.tables import gpu_tag, markdown_table, run_header, write_report


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


@pytest.mark.parametrize(
    ("device_name", "tag"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA GeForce RTX 4090", "NVIDIA-GeForce-RTX-4090"),
        ("AMD Instinct MI300X", "AMD-Instinct-MI300X"),
        ("CPU", "CPU"),
        (" odd / name ", "odd-name"),
        ("", "unknown"),
    ],
)
def test_gpu_tag_is_the_short_card_name_or_a_file_name_safe_one(device_name, tag):
    assert gpu_tag(device_name) == tag
