"""The attention demo: SageSLA against dense attention on video-like inputs, as a table.

Q/K/V come from ``sagesla.synthetic.video_like_qkv`` (tokens on a frames x height x width grid, attention mostly
local). For each topk it reports the backend, the real sparsity, rel-L1 and cosine against dense attention, and
the median time of a few runs.
"""

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sagesla import metrics, ops
from sagesla.functional import sparse_linear_attn
from sagesla.settings import SLASettings
from sagesla.synthetic import video_like_qkv
from sagesla.tables import markdown_table


@dataclass(frozen=True)
class DemoRow:
    method: str
    backend: str
    topk: float | None
    sparsity: float
    rel_l1: float
    cosine: float
    ms: float


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: compilation, caches
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def run_attention_demo(
    topks: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5),
    *,
    heads: int = 4,
    frames: int = 8,
    height: int = 24,
    width: int = 32,
    head_dim: int = 64,
    device: str | None = None,
    repeats: int = 3,
    seed: int = 0,
) -> list[DemoRow]:
    """Dense attention and SageSLA at each topk on one set of video-like inputs (proj_l zero: pure sparse).

    Errors are against fp32 dense attention of the same bf16 inputs.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16
    q, k, v = video_like_qkv(1, heads, frames, height, width, head_dim, seed=seed, dtype=dtype, device=dev)
    dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    dense_half = F.scaled_dot_product_attention(q, k, v)
    ms = _median_ms(lambda: F.scaled_dot_product_attention(q, k, v), repeats, dev)
    errors = metrics.rel_l1(dense_half, dense), metrics.cosine(dense_half, dense)
    rows = [DemoRow("dense (SDPA)", "torch", None, 0.0, *errors, ms)]
    backend = ops.resolve_backend(q, SLASettings().resolve(dev))
    for topk in topks:

        def call(topk=topk):
            return sparse_linear_attn(q, k, v, topk=topk, return_sparsity=True)

        out, sparsity = call()
        rows.append(
            DemoRow(
                "SageSLA",
                backend,
                topk,
                sparsity,
                metrics.rel_l1(out, dense),
                metrics.cosine(out, dense),
                _median_ms(call, repeats, dev),
            )
        )
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    return markdown_table(
        ["method", "backend", "topk", "sparsity", "rel-L1 vs dense", "cosine vs dense", "ms"],
        [
            [
                r.method,
                r.backend,
                "-" if r.topk is None else f"{r.topk:g}",
                f"{r.sparsity:.1%}",
                f"{r.rel_l1:.4f}",
                f"{r.cosine:.5f}",
                f"{r.ms:.1f}",
            ]
            for r in rows
        ],
    )
