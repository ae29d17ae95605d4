"""GitHub-style markdown tables and result files for the demo and the benchmarks."""

import datetime
import json
import os
import pathlib
import re
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


# A data-centre card's model in a CUDA device name: "H100" in "NVIDIA H100 80GB HBM3", "A100" in
# "NVIDIA A100-SXM4-80GB", "L40S", "GH200". Consumer names ("NVIDIA GeForce RTX 4090") have none and are kept whole.
_CARD_MODEL = re.compile(r"(?<![A-Za-z0-9])(G?[ABHLT][0-9]{1,4}[A-Z]?)(?![A-Za-z0-9])")


def gpu_tag(device_name: str) -> str:
    """The short card name that starts a result file's name (``<tag>-attention.json``).

    ``"NVIDIA H100 80GB HBM3"`` -> ``"H100"``, ``"NVIDIA H200"`` -> ``"H200"``; a name without a data-centre model
    number is kept with every run of characters other than letters, digits, ``.`` and ``_`` replaced by ``-``
    (``"NVIDIA GeForce RTX 4090"`` -> ``"NVIDIA-GeForce-RTX-4090"``, ``"CPU"`` -> ``"CPU"``).
    """
    match = _CARD_MODEL.search(device_name)
    if match:
        return match.group(1)
    return re.sub(r"[^A-Za-z0-9._]+", "-", device_name).strip("-") or "unknown"


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
