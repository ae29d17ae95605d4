"""Attention benchmark: SageSLA (ours) against dense SDPA (flash, cuDNN) and optional peers, on Wan shapes.

Usage:
    python scripts/bench_attention.py [--out-dir benchmarks/results] [--quick]

Prints a markdown table and writes ``<out-dir>/<gpu>-attention.{json,md}``. Timings are medians of
``triton.testing.do_bench`` after warm-up, on one card in one run; TFLOP/s-eq = 4*B*H*L^2*D / time.
Accuracy (rel-L1, cosine) is measured at L=8192 with the same H, D against a float32 dense reference masked to
the same block selection, with a random ``proj_l`` of std 0.02 (anchors.md's setup).
"""

import argparse
import importlib.util
import pathlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from sagesla import metrics
from sagesla.kernels.block_select import select_blocks
from sagesla.kernels.quant import kv_stats, quant_qk, quant_v_fp8
from sagesla.kernels.quant_ref import LOG2E
from sagesla.kernels.sla import sla_forward
from sagesla.kernels.sparse_attn import sparse_attn_fwd
from sagesla.tables import markdown_table, run_header, write_report
from sagesla.testing import sla_dense_reference

SHAPES = [
    (1, 12, 32760, 128, "Wan2.1-1.3B 480p"),
    (2, 16, 32760, 128, "SLA paper"),
    (1, 40, 75600, 128, "Wan2.1-14B 720p"),
]
TOPKS = (0.05, 0.1, 0.2)
# (num_warps, num_stages) of the sparse kernel tried at topk 0.05 with --sweep.
SWEEP = ((4, 2), (4, 1), (8, 1))
# (programs, num_warps, num_stages) of kv_stats tried with --sweep.
KV_SWEEP = ((528, 4, 2), (264, 4, 2), (528, 4, 3), (528, 2, 2))


@dataclass(frozen=True)
class Row:
    shape: str
    topk: float | None
    op: str
    ms: float
    tflops: float
    speedup: float | None = None
    rel_l1: float | None = None
    cosine: float | None = None


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def inputs(b, h, l, d, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, h, l, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, h, l, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = k + 0.5 * torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(b, h, l, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v


def ours(q, k, v, topk, pv, proj, out, blocks=(64, 128)):
    w, bias = proj
    return sla_forward(
        q,
        k,
        v,
        topk=topk,
        block_q=blocks[0],
        block_k=blocks[1],
        sm_scale=q.shape[-1] ** -0.5,
        quantized=True,
        pv_precision=pv,
        feature_map="softmax",
        linear_scope="all",
        proj_weight=w,
        proj_bias=bias,
        out=out,
    )


def accuracy(h, d, topk, pv, blocks) -> tuple[float, float]:
    """rel-L1 and cosine of ours vs float32 dense masked to our selection (+ the linear branch), L=8192."""
    q, k, v = inputs(1, h, 8192, d, seed=1)
    w = torch.randn(d, d, device="cuda") * 0.02
    bias = torch.randn(d, device="cuda") * 0.02
    out = torch.empty_like(q)
    lut = ours(q, k, v, topk, pv, (w, bias), out, blocks)
    ref = sla_dense_reference(q, k, v, lut, *blocks, w, bias)
    return metrics.rel_l1(out, ref), metrics.cosine(out, ref)


def stages(q, k, v, topk, pv, proj, blocks, sweep=False):
    """Median ms of each stage: prep (reductions + quantization), selection, sparse loop, sparse loop + linear."""
    w, bias = proj
    bq, bk = blocks
    d = q.shape[-1]
    pv_fp8 = pv == "fp8"
    st = kv_stats(k, v, pv_fp8, "softmax")
    qk = quant_qk(q, k, bq, bk, d**-0.5 * LOG2E, st.k_mean)
    lut = select_blocks(qk.q_pool, qk.k_pool, topk)
    v_in, v_scale = quant_v_fp8(v, st.v_amax, qk.k_int8.shape[2]) if pv_fp8 else (v, None)
    out = torch.empty_like(q)
    kvw = (st.kv @ w.t()).to(torch.bfloat16).contiguous()
    lin = (q, kvw, st.ksum.contiguous(), bias)

    def prep():
        s = kv_stats(k, v, pv_fp8, "softmax")
        quant_qk(q, k, bq, bk, d**-0.5 * LOG2E, s.k_mean)
        if pv_fp8:
            quant_v_fp8(v, s.v_amax, qk.k_int8.shape[2])

    times = {
        "prep": bench(prep),
        "kv_stats": bench(lambda: kv_stats(k, v, pv_fp8, "softmax")),
        "quant_qk": bench(lambda: quant_qk(q, k, bq, bk, d**-0.5 * LOG2E, st.k_mean)),
        "quant_v": bench(lambda: quant_v_fp8(v, st.v_amax, qk.k_int8.shape[2])) if pv_fp8 else 0.0,
        "select": bench(lambda: select_blocks(qk.q_pool, qk.k_pool, topk)),
        "sparse": bench(
            lambda: sparse_attn_fwd(qk.q_int8, qk.q_scale, qk.k_int8, qk.k_scale, v_in, v_scale, lut, bq, bk, out)
        ),
        "sparse+linear": bench(
            lambda: sparse_attn_fwd(
                qk.q_int8, qk.q_scale, qk.k_int8, qk.k_scale, v_in, v_scale, lut, bq, bk, out, linear=lin
            )
        ),
    }
    if sweep:
        for programs, warps, stages_ in KV_SWEEP:
            times[f"kv_stats p{programs}w{warps}s{stages_}"] = bench(
                lambda programs=programs, warps=warps, stages_=stages_: kv_stats(
                    k, v, pv_fp8, "softmax", programs=programs, num_warps=warps, num_stages=stages_
                )
            )
        for warps, stages_ in SWEEP:
            times[f"sparse+linear w{warps}s{stages_}"] = bench(
                lambda warps=warps, stages_=stages_: sparse_attn_fwd(
                    qk.q_int8,
                    qk.q_scale,
                    qk.k_int8,
                    qk.k_scale,
                    v_in,
                    v_scale,
                    lut,
                    bq,
                    bk,
                    out,
                    linear=lin,
                    num_warps=warps,
                    num_stages=stages_,
                )
            )
    return times


def bench_shape(b, h, l, d, name, blocks, sage, sweep) -> tuple[list[Row], list[dict]]:
    """Dense baselines once, then ours at each topk and P.V precision, with accuracy and stage times."""
    shape = f"B{b} H{h} L{l} D{d} ({name})"
    flops = 4 * b * h * l * l * d
    q, k, v = inputs(b, h, l, d)
    dense = {}
    for label, backend in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                dense[label] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        except RuntimeError as err:
            print(f"{label} unavailable: {err}")
    best = min(dense.values())
    rows = [Row(shape, None, label, ms, flops / ms / 1e9, best / ms) for label, ms in dense.items()]
    if sage:
        from sageattention import sageattn

        k_copy = k.clone()  # sageattn 1.0.6 subtracts the K mean in place
        ms = bench(lambda: sageattn(q, k_copy, v, tensor_layout="HND"))
        rows.append(Row(shape, None, "sageattention 1.0.6", ms, flops / ms / 1e9, best / ms))
    proj = (torch.randn(d, d, device="cuda") * 0.02, torch.randn(d, device="cuda") * 0.02)
    out = torch.empty_like(q)
    stage_rows = []
    for topk in TOPKS:
        for pv in ("fp8", "half"):
            ms = bench(lambda topk=topk, pv=pv: ours(q, k, v, topk, pv, proj, out, blocks))
            err = accuracy(h, d, topk, pv, blocks) if b * h * l <= 16 * 2 * 32760 else (None, None)
            rows.append(Row(shape, topk, f"SageSLA ours (P.V {pv})", ms, flops / ms / 1e9, best / ms, *err))
            st = stages(q, k, v, topk, pv, proj, blocks, sweep=sweep and topk == TOPKS[0])
            kernel_ms = st["sparse+linear"]
            rows.append(
                Row(shape, topk, f"  kernel only (P.V {pv})", kernel_ms, flops / kernel_ms / 1e9, best / kernel_ms)
            )
            stage_rows.append({"shape": shape, "topk": topk, "pv": pv, "total": ms, **st})
    return rows, stage_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--blocks", default="64x128", help="BQxBK of ours")
    parser.add_argument("--sweep", action="store_true", help="also time the sparse kernel's warps/stages options")
    args = parser.parse_args()
    blocks = tuple(int(x) for x in args.blocks.split("x"))
    gpu = torch.cuda.get_device_name()
    header = run_header(gpu, blocks=args.blocks)
    print(" | ".join(f"{k}: {v}" for k, v in header.items()))
    sage = importlib.util.find_spec("sageattention") is not None
    rows: list[Row] = []
    stage_rows: list[dict] = []
    for b, h, l, d, name in SHAPES[:1] if args.quick else SHAPES:
        shape_rows, shape_stages = bench_shape(b, h, l, d, name, blocks, sage, args.sweep)
        rows += shape_rows
        stage_rows += shape_stages
        torch.cuda.empty_cache()

    table = markdown_table(
        ["shape", "topk", "op", "ms", "TFLOP/s-eq", "speed-up vs best SDPA", "rel-L1 (L=8192)", "cosine"],
        [
            [
                r.shape,
                "-" if r.topk is None else r.topk,
                r.op,
                f"{r.ms:.3f}",
                f"{r.tflops:.0f}",
                "-" if r.speedup is None else f"{r.speedup:.2f}x",
                "-" if r.rel_l1 is None else f"{r.rel_l1:.4f}",
                "-" if r.cosine is None else f"{r.cosine:.5f}",
            ]
            for r in rows
        ],
    )
    stage_table = markdown_table(
        [
            "shape",
            "topk",
            "P.V",
            "total ms",
            "prep",
            "kv_stats",
            "quant_qk",
            "quant_v",
            "select",
            "sparse loop",
            "sparse+linear",
            "non-loop share",
        ],
        [
            [
                s["shape"],
                s["topk"],
                s["pv"],
                f"{s['total']:.3f}",
                f"{s['prep']:.3f}",
                f"{s['kv_stats']:.3f}",
                f"{s['quant_qk']:.3f}",
                f"{s['quant_v']:.3f}",
                f"{s['select']:.3f}",
                f"{s['sparse']:.3f}",
                f"{s['sparse+linear']:.3f}",
                f"{1 - s['sparse'] / s['total']:.0%}",
            ]
            for s in stage_rows
        ],
    )
    sweeps = [
        f"{s['shape']} P.V {s['pv']}: " + ", ".join(f"{k.split()[-1]} {v:.3f}" for k, v in s.items() if " w" in k)
        for s in stage_rows
        if any(" w" in k for k in s)
    ]
    print(table)
    print()
    print(stage_table)
    print("\n".join(sweeps))
    write_report(
        pathlib.Path(args.out_dir) / f"{gpu.replace(' ', '-')}-attention",
        header,
        {"rows": [asdict(r) for r in rows], "stages": stage_rows},
        table + "\n\n" + stage_table,
    )


if __name__ == "__main__":
    main()
