"""Linear-branch benchmark: the SageSLA forward with a trained and an all-zero ``proj_l``, and the trainable SLA's
forward + backward with ``linear_scope="complement"``, through the public modules.

Usage:
    python scripts/bench_linear_branch.py [--out-dir benchmarks/results] [--label NAME] [--compare OTHER.json]
    python scripts/bench_linear_branch.py --quick   # the Wan2.1-1.3B shape only
    python scripts/bench_linear_branch.py --smoke   # CPU, one tiny shape, torch backend: checks the script runs

Timings are medians of ``triton.testing.do_bench`` after warm-up: "eager" calls the module, "graph" replays one
forward captured in a CUDA graph (GPU time without Python's launch overhead). The inputs are random bf16 [B, H, L, D]
(HND); a trained ``proj_l`` is random with std 0.02. Writes ``<out-dir>/<gpu>-linear-branch[-label].{json,md}``;
``--compare`` adds the columns of another run of this script (the same card, the same run of the machine) and the
ratio of ours to it.
"""

import argparse
import json
import pathlib
import statistics
import time

import torch
import triton

import sagesla
from sagesla.tables import gpu_tag, markdown_table, run_header, write_report

SHAPES = [(1, 12, 32760, 128, "Wan2.1-1.3B 480p"), (1, 40, 75600, 128, "Wan2.1-14B 720p")]
SMOKE_SHAPES = [(1, 2, 256, 64, "smoke")]
TOPK = 0.05
# Training rows: at 0.05 the complement is the total minus the selected blocks; at 0.9 fewer blocks are left out
# than selected, and the kernels sum the unselected blocks directly.
TRAIN_TOPKS = (0.05, 0.9)


def _median_ms(fn, device: str, warmup: int, rep: int) -> float:
    """Median ms of ``fn``: ``do_bench`` on a GPU, wall-clock repeats on CPU (the smoke run)."""
    if device == "cuda":
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _graph_ms(fn) -> float:
    """Median ms of replaying one captured call of ``fn``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=50, rep=300, return_mode="median")


def _inference_rows(shape, device: str) -> list[dict]:
    B, H, L, D, name = shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=torch.bfloat16) for _ in range(3))
    attn = sagesla.SageSparseLinearAttention(D, TOPK).to(device)
    rows = []
    for weights in ("trained", "zero"):
        with torch.no_grad():
            if weights == "trained":
                attn.proj_l.weight.normal_(0.0, 0.02)
                attn.proj_l.bias.normal_(0.0, 0.02)
            else:
                attn.init_weights_()

            def forward():
                return attn(q, k, v)

            forward()
            eager = _median_ms(forward, device, 50, 300)
            graph = _graph_ms(forward) if device == "cuda" else None
        rows.append({"case": f"SageSLA forward, proj_l {weights}", "shape": name, "eager_ms": eager, "graph_ms": graph})
    return rows


def _training_row(shape, topk: float, device: str) -> dict:
    B, H, L, D, name = shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, L, D, device=device, dtype=torch.bfloat16)
    attn = sagesla.SparseLinearAttention(D, topk, linear_scope="complement").to(device)
    with torch.no_grad():
        attn.proj_l.weight.normal_(0.0, 0.02)

    def step():
        for x in (q, k, v):
            x.grad = None
        attn(q, k, v).backward(grad)

    ms = _median_ms(step, device, 20, 200)
    return {
        "case": f"SLA forward+backward, scope complement, topk {topk}",
        "shape": name,
        "eager_ms": ms,
        "graph_ms": None,
    }


def _cell(value: object) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--label", default="", help="suffix of the output files")
    parser.add_argument("--compare", type=pathlib.Path, help="JSON of another run of this script")
    parser.add_argument("--smoke", action="store_true", help="CPU, one tiny shape (checks the script runs)")
    parser.add_argument("--quick", action="store_true", help="the first shape only")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    header = run_header(torch.cuda.get_device_name() if device == "cuda" else "CPU")
    rows = []
    for shape in SMOKE_SHAPES if args.smoke else SHAPES[:1] if args.quick else SHAPES:
        rows += _inference_rows(shape, device)
        rows += [_training_row(shape, topk, device) for topk in TRAIN_TOPKS]
    columns = ["case", "shape", "eager_ms", "graph_ms"]
    if args.compare:
        other = {(row["case"], row["shape"]): row for row in json.loads(args.compare.read_text())["rows"]}
        for row in rows:
            base = other.get((row["case"], row["shape"]), {})
            row["other_eager_ms"], row["other_graph_ms"] = base.get("eager_ms"), base.get("graph_ms")
            row["eager_ratio"] = row["eager_ms"] / row["other_eager_ms"] if row["other_eager_ms"] else None
        columns += ["other_eager_ms", "other_graph_ms", "eager_ratio"]
    table = markdown_table(columns, [[_cell(row[column]) for column in columns] for row in rows])
    print(table)
    name = gpu_tag(header["gpu"]) + "-linear-branch" + (f"-{args.label}" if args.label else "")
    write_report(
        pathlib.Path(args.out_dir) / name, header, {"topk": TOPK, "train_topks": TRAIN_TOPKS, "rows": rows}, table
    )


if __name__ == "__main__":
    main()
