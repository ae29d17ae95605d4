"""GitHub-style markdown tables and result files for the demo and the benchmarks."""

import datetime
import json
import os
import pathlib
import subprocess
from collections.abc import Sequence

from sagesla.files import write_text_atomic


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render rows (already formatted or plain values) under headers, columns padded to align."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run_header(device_name: str, **extra: object) -> dict[str, object]:
    """Benchmark provenance: device, torch and triton versions, commit, date, then ``extra``.

    The GPU machine gets the working tree without .git: scripts/gpu_check.sh passes the commit in
    ``SAGESLA_GIT_SHA``.
    """
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    sha = (
        os.environ.get("SAGESLA_GIT_SHA")
        or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    )
    return {
        "gpu": device_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "git": sha or "unknown",
        "date": datetime.date.today().isoformat(),
        **extra,
    }


def write_report(stem: pathlib.Path, header: dict, payload: dict, markdown: str) -> None:
    """``stem.json`` (header + payload) and ``stem.md`` (header as a list, then ``markdown``), each atomically; dots
    in the stem's name (``...-wan2.1-1.3b``) stay."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stem.with_name(stem.name + ".json"), json.dumps({**header, **payload}, indent=1))
    write_text_atomic(
        stem.with_name(stem.name + ".md"),
        "\n".join(f"- {k}: {v}" for k, v in header.items()) + "\n\n" + markdown + "\n",
    )
