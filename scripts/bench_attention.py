"""Attention benchmark: SageSLA (ours) against dense SDPA (flash, cuDNN) and optional peers, on Wan shapes.

Usage:
    python scripts/bench_attention.py [--out-dir benchmarks/results] [--quick]

Prints a markdown table and writes ``<out-dir>/<gpu>-attention.{json,md}``. Timings are medians of
``triton.testing.do_bench`` after warm-up, on one card in one run (the inference stage table's times, and its
second total, are medians of CUDA-graph replays: GPU time without Python's launch overhead);
TFLOP/s-eq = 4*B*H*L^2*D / time for a forward and 3.5 times that for forward+backward (the backward as 2.5
forwards, FlashAttention's count).
The reference SageSLA (thu-ml/SLA's ``SageSLA`` package on spas_sage_attn, both built from source) gets a row
per topk when both are installed. Accuracy (rel-L1, cosine) is measured at L=8192 with the same H, D against a
float32 dense reference masked to the same block selection, with a random ``proj_l`` of std 0.02 (anchors.md's
setup). For the trainable SLA (unquantized, blocks 64 x 64, the module's default) the forward+backward rows
report the worst rel-L1 and cosine over out, dq, dk, dv and d proj_l against fp32 autograd of the reference with
the same selection.
"""

import argparse
import importlib.util
import pathlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from sagesla import metrics, sparse_linear_attn
from sagesla.kernels.block_select import select_blocks
from sagesla.kernels.constants import LOG2E
from sagesla.kernels.kv_stats import KV_PROGRAMS, KV_STAGES, KV_WARPS, inference_stats, kv_stats
from sagesla.kernels.linear_attn_ref import linear_attn_ref
from sagesla.kernels.linear_attn_train import linear_attn_bwd_q, linear_state
from sagesla.kernels.quant import quant_qk, quant_v_fp8_scaled
from sagesla.kernels.sla import sla_forward
from sagesla.kernels.sla_train import sla_train_forward
from sagesla.kernels.sparse_attn import sparse_attn_fwd
from sagesla.kernels.sparse_attn_ref import sparse_attn_ref
from sagesla.kernels.sparse_attn_train import key_block_queries, sparse_attn_train_bwd, sparse_attn_train_fwd
from sagesla.settings import SLASettings
from sagesla.tables import gpu_tag, markdown_table, run_header, write_report
from sagesla.testing import sla_dense_reference
from sagesla.validation import PV_PRECISIONS

SHAPES = [
    (1, 12, 32760, 128, "Wan2.1-1.3B 480p"),
    (2, 16, 32760, 128, "SLA paper"),
    (1, 40, 75600, 128, "Wan2.1-14B 720p"),
]
TOPKS = (0.05, 0.1, 0.2)
# P.V precisions of ours timed at each topk (the public API's explicit choices, "auto" picks one of them).
PVS = tuple(pv for pv in PV_PRECISIONS if pv != "auto")
# Row label of the reference SageSLA (thu-ml's, on spas_sage_attn), when installed.
REFERENCE_SAGESLA = "SageSLA reference (thu-ml, spas_sage_attn)"
# (num_warps, num_stages) of the sparse kernel tried at topk 0.05 with --sweep.
SWEEP = ((4, 2), (4, 1), (8, 1))
# (programs, num_warps, num_stages) of kv_stats tried with --sweep: the default, half and twice the programs, a stage
# fewer.
KV_SWEEP = (
    (KV_PROGRAMS, KV_WARPS, KV_STAGES),
    (KV_PROGRAMS // 2, KV_WARPS, KV_STAGES),
    (KV_PROGRAMS * 2, KV_WARPS, KV_STAGES),
    (KV_PROGRAMS, KV_WARPS, KV_STAGES - 1),
)
# (num_warps, num_stages) of each trainable-SLA kernel tried with --sweep (defaults: sparse_attn_train.LAUNCH).
TRAIN_SWEEP = ((4, 2), (4, 3), (8, 2), (8, 3))
TRAIN_SWEEP_KEYS = tuple(f" w{w}s{s}" for w, s in TRAIN_SWEEP)
# Blocks of the trainable SLA (SparseLinearAttention's default BLKQ x BLKK).
TRAIN_BLOCKS = (64, 64)
# A forward+backward counts as 3.5 forwards (the backward as 2.5).
TRAIN_FLOPS = 3.5


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


def bench(fn, grad_to_none=None) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def bench_graph(fn) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph: GPU time alone, without Python's launch overhead (which
    otherwise inflates a stage of a few tens of microseconds) and without flushing L2 between replays."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


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
    # proj_l from a seeded RNG too, so rel-L1 does not depend on the RNG state the timings leave behind
    torch.manual_seed(2)
    w = torch.randn(d, d, device="cuda") * 0.02
    bias = torch.randn(d, device="cuda") * 0.02
    out = torch.empty_like(q)
    lut = ours(q, k, v, topk, pv, (w, bias), out, blocks)
    ref = sla_dense_reference(q, k, v, lut, *blocks, w, bias)
    return metrics.rel_l1(out, ref), metrics.cosine(out, ref)


def stages(q, k, v, topk, pv, proj, blocks, sweep=False):
    """Median ms, from CUDA-graph replays, of the whole forward and of each stage: prep (reductions +
    quantization), selection, sparse loop, sparse loop + linear."""
    w, bias = proj
    bq, bk = blocks
    d = q.shape[-1]
    pv_fp8 = pv == "fp8"
    st = inference_stats(k, v, pv_fp8, "softmax", w)
    qk = quant_qk(q, k, bq, bk, d**-0.5 * LOG2E, st.k_mean)
    lut = select_blocks(qk.q_pool, qk.k_pool, topk)
    v_scale = st.v_scale
    v_in = quant_v_fp8_scaled(v, v_scale, qk.k_int8.shape[2]) if pv_fp8 else v
    out = torch.empty_like(q)
    lin = (q, st.kvw, st.z, st.w_live, bias)

    def prep():
        s = inference_stats(k, v, pv_fp8, "softmax", w)
        quant_qk(q, k, bq, bk, d**-0.5 * LOG2E, s.k_mean)
        if pv_fp8:
            quant_v_fp8_scaled(v, s.v_scale, qk.k_int8.shape[2])

    times = {
        "total (graph)": bench_graph(lambda: ours(q, k, v, topk, pv, proj, out, blocks)),
        "prep": bench_graph(prep),
        # the reductions with the proj_l fold and the V scales, as the forward runs them
        "kv_stats": bench_graph(lambda: inference_stats(k, v, pv_fp8, "softmax", w)),
        "quant_qk": bench_graph(lambda: quant_qk(q, k, bq, bk, d**-0.5 * LOG2E, st.k_mean)),
        "quant_v": bench_graph(lambda: quant_v_fp8_scaled(v, v_scale, qk.k_int8.shape[2])) if pv_fp8 else 0.0,
        "select": bench_graph(lambda: select_blocks(qk.q_pool, qk.k_pool, topk)),
        "sparse": bench_graph(
            lambda: sparse_attn_fwd(qk.q_int8, qk.q_scale, qk.k_int8, qk.k_scale, v_in, v_scale, lut, bq, bk, out)
        ),
        "sparse+linear": bench_graph(
            lambda: sparse_attn_fwd(
                qk.q_int8, qk.q_scale, qk.k_int8, qk.k_scale, v_in, v_scale, lut, bq, bk, out, linear=lin
            )
        ),
    }
    if sweep:
        for programs, warps, stages_ in KV_SWEEP:
            times[f"kv_stats p{programs}w{warps}s{stages_}"] = bench_graph(
                lambda programs=programs, warps=warps, stages_=stages_: kv_stats(
                    k, v, pv_fp8, "softmax", programs=programs, num_warps=warps, num_stages=stages_
                )
            )
        for warps, stages_ in SWEEP:
            times[f"sparse+linear w{warps}s{stages_}"] = bench_graph(
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


def train_leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Leaf copies that require grad (q, k, v and optionally proj_l's weight and bias)."""
    return [x.detach().clone().requires_grad_() for x in tensors]


def ours_train(q, k, v, w, b, topk):
    """The trainable SLA (unquantized) through the public API, as SparseLinearAttention runs it on the GPU."""
    bq, bk = TRAIN_BLOCKS
    return sparse_linear_attn(
        q, k, v, topk=topk, quantized=False, proj_weight=w, proj_bias=b, block_q=bq, block_k=bk, backend="triton"
    )


def fwd_bwd(fn, leaves, grad) -> float:
    """Median ms of ``fn(*leaves).backward(grad)``."""
    return bench(lambda: fn(*leaves).backward(grad), grad_to_none=leaves)


def held_mib(fn, leaves) -> float:
    """MiB the forward leaves allocated for the backward (output included), inputs excluded."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = fn(*leaves)
    held = torch.cuda.memory_allocated() - before
    del out
    return held / 2**20


def train_accuracy(h, d, topk) -> dict[str, tuple[float, float]]:
    """rel-L1 and cosine of ours (out and every gradient) vs fp32 autograd of the reference, same selection, L=8192."""
    bq, bk = TRAIN_BLOCKS
    q, k, v = inputs(1, h, 8192, d, seed=1)
    torch.manual_seed(2)  # proj_l and the output gradient reproducible (as in ``accuracy``)
    proj = (torch.randn(d, d, device="cuda") * 0.02, torch.randn(d, device="cuda") * 0.02)
    grad = torch.randn_like(q)
    leaves = train_leaves(q, k, v, *proj)
    out = torch.empty_like(q)
    lut = sla_train_forward(
        *leaves[:3],
        topk=topk,
        block_q=bq,
        block_k=bk,
        sm_scale=d**-0.5,
        quantized=False,
        pv_precision="half",
        feature_map="softmax",
        linear_scope="all",
        proj_weight=leaves[3],
        proj_bias=leaves[4],
        out=out,
    )
    out.backward(grad)
    ref_leaves = train_leaves(q.float(), k.float(), v.float(), *proj)
    ref = sparse_attn_ref(*ref_leaves[:3], lut, bq, bk, d**-0.5)
    ref = ref + linear_attn_ref(*ref_leaves[:3], "softmax", *ref_leaves[3:])
    ref.backward(grad.float())
    names = ("out", "dq", "dk", "dv", "dW", "db")
    pairs = [(out.detach(), ref.detach())] + [(a.grad, r.grad) for a, r in zip(leaves, ref_leaves, strict=True)]
    return {n: (metrics.rel_l1(t, r), metrics.cosine(t, r)) for n, (t, r) in zip(names, pairs, strict=True)}


def train_stages(q, k, v, topk, proj, sweep=False) -> dict:
    """Median ms of each stage of the trainable SLA's forward and backward, the linear branch's cost in our kernels
    against torch autograd of ``linear_attn_ref``, and (``sweep``) the kernels' warps/stages options."""
    bq, bk = TRAIN_BLOCKS
    d = q.shape[-1]
    sm = d**-0.5
    w, b = proj
    st = kv_stats(k, v, False, "softmax")
    pools = quant_qk(q, k, bq, bk, 1.0, st.k_mean)
    lut = select_blocks(pools.q_pool, pools.k_pool, topk)
    state = linear_state(st.kv, st.ksum, w)
    bias = b.float().contiguous()
    out = torch.empty_like(q)
    lse = sparse_attn_train_fwd(q, k, v, lut, bq, bk, sm, out, linear=state, bias=bias)
    grad = torch.randn_like(q)

    def bwd_q():
        return linear_attn_bwd_q(q, k, v, grad, out, bias, lut, state, w, "softmax", False, bq, bk)

    lin = bwd_q()

    def select():
        s_ = kv_stats(k, v, False, "softmax")
        p_ = quant_qk(q, k, bq, bk, 1.0, s_.k_mean)
        select_blocks(p_.q_pool, p_.k_pool, topk)

    def fwd(**launch):
        return sparse_attn_train_fwd(q, k, v, lut, bq, bk, sm, out, linear=state, bias=bias, **launch)

    def bwd(linear=lin, **kwargs):
        return sparse_attn_train_bwd(q, k, v, out, lse, grad, lut, bq, bk, sm, linear=linear, **kwargs)

    lq = train_leaves(q, k, v, w, b)
    times = {
        "select": bench(select),
        "kv_stats": bench(lambda: kv_stats(k, v, False, "softmax")),
        "kv_stats, k mean only": bench(lambda: kv_stats(k, v, False, None)),
        "fwd kernel": bench(fwd),
        "fwd kernel, no linear": bench(lambda: sparse_attn_train_fwd(q, k, v, lut, bq, bk, sm, out)),
        "bwd linear q-side": bench(bwd_q),
        "inverse index": bench(lambda: key_block_queries(lut, triton.cdiv(q.shape[-2], bk))),
        "bwd dq+dkv": bench(bwd),
        "bwd dq+dkv, no linear": bench(lambda: bwd(linear=None, bias=bias)),
        "linear torch autograd fwd+bwd": fwd_bwd(lambda *x: linear_attn_ref(*x[:3], "softmax", *x[3:]), lq, grad),
    }
    times["linear ours fwd+bwd"] = (
        times["kv_stats"]
        - times["kv_stats, k mean only"]
        + times["fwd kernel"]
        - times["fwd kernel, no linear"]
        + times["bwd linear q-side"]
        + times["bwd dq+dkv"]
        - times["bwd dq+dkv, no linear"]
    )
    if sweep:
        for warps, stages_ in TRAIN_SWEEP:
            launch = {"num_warps": warps, "num_stages": stages_}
            times[f"fwd kernel w{warps}s{stages_}"] = bench(lambda launch=launch: fwd(**launch))
            for kernel in ("dq", "dkv"):
                times[f"bwd with {kernel} w{warps}s{stages_}"] = bench(
                    lambda kernel=kernel, launch=(warps, stages_): bwd(launch={kernel: launch})
                )
    return times


def train_rows(q, k, v, shape, flops, proj, accurate, sweep) -> tuple[list[Row], list[dict]]:
    """SDPA and ours forward+backward (plus our unquantized forward) at each topk, with accuracy and stages."""
    grad = torch.randn_like(q)
    dense_leaves = train_leaves(q, k, v)
    dense = {}
    for label, backend in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                dense[label] = fwd_bwd(F.scaled_dot_product_attention, dense_leaves, grad)
                held_dense = held_mib(F.scaled_dot_product_attention, dense_leaves)
        except RuntimeError as err:
            print(f"{label} fwd+bwd unavailable: {err}")
    best = min(dense.values())
    train_flops = TRAIN_FLOPS * flops
    rows = [Row(shape, None, f"{label} fwd+bwd", ms, train_flops / ms / 1e9, best / ms) for label, ms in dense.items()]
    leaves = train_leaves(q, k, v, *proj)
    stage_rows = []
    for topk in TOPKS:
        err = train_accuracy(q.shape[1], q.shape[-1], topk) if accurate else None
        with torch.no_grad():
            ms = bench(lambda topk=topk: ours_train(*leaves, topk))
        fwd_err = err["out"] if err else (None, None)
        rows.append(Row(shape, topk, "SLA ours (unquantized), fwd", ms, flops / ms / 1e9, None, *fwd_err))
        ms = fwd_bwd(lambda *x, topk=topk: ours_train(*x, topk), leaves, grad)
        worst = (max(e[0] for e in err.values()), min(e[1] for e in err.values())) if err else (None, None)
        rows.append(Row(shape, topk, "SLA ours (unquantized), fwd+bwd", ms, train_flops / ms / 1e9, best / ms, *worst))
        st = train_stages(q, k, v, topk, proj, sweep=sweep and topk == TOPKS[0])
        held = held_mib(lambda *x, topk=topk: ours_train(*x, topk), leaves)
        errs = {f"rel-L1 {n}": e[0] for n, e in err.items()} if err else {}
        stage_rows.append(
            {"shape": shape, "topk": topk, "fwd+bwd": ms, "held MiB": held, "held MiB SDPA": held_dense, **st, **errs}
        )
    return rows, stage_rows


def ours_label(pv: str) -> str:
    """Row label of ours (the whole forward) at P.V precision ``pv``."""
    return f"SageSLA ours (P.V {pv})"


def reference_sagesla(head_dim: int, topk: float, proj: tuple[torch.Tensor, torch.Tensor]):
    """thu-ml's SageSLA (``SageSLA.SageSparseLinearAttention`` of github.com/thu-ml/SLA on spas_sage_attn's CUDA
    kernels) with our ``proj_l``, as a module to call on (q, k, v), or None when either package is not installed.
    Its blocks are its own (64 x 128 on sm90, 128 x 64 elsewhere), its selection one global topk."""
    if importlib.util.find_spec("spas_sage_attn") is None or importlib.util.find_spec("SageSLA") is None:
        return None
    from SageSLA import SageSparseLinearAttention

    module = SageSparseLinearAttention(head_dim, topk, feature_map="softmax").to(proj[0].device)
    with torch.no_grad():
        module.proj_l.weight.copy_(proj[0])
        module.proj_l.bias.copy_(proj[1])
    return module


def pv_auto_summary(stage_rows: list[dict], rows: list[Row], auto: str) -> dict:
    """What ``pv_precision="auto"`` takes on this GPU (``auto``) against this run: at how many (shape, topk) points
    each P.V precision had the lower total, and each one's rel-L1 range (L=8192)."""
    totals = {(s["shape"], s["topk"], s["pv"]): s["total"] for s in stage_rows}
    points = sorted({(shape, topk) for shape, topk, _ in totals})
    faster = [min(PVS, key=lambda pv, p=p: totals[(*p, pv)]) for p in points if all((*p, pv) in totals for pv in PVS)]
    errors = {pv: [r.rel_l1 for r in rows if r.op == ours_label(pv) and r.rel_l1 is not None] for pv in PVS}
    return {
        "auto": auto,
        "points": len(faster),
        "faster": {pv: faster.count(pv) for pv in PVS},
        "rel_l1": {pv: [min(e), max(e)] for pv, e in errors.items() if e},
    }


def pv_auto_line(summary: dict) -> str:
    """``pv_auto_summary`` as one sentence of the report."""
    counts = ", ".join(f"{pv} at {n}" for pv, n in summary["faster"].items())
    errors = ", ".join(f"{pv} {lo:.4f}-{hi:.4f}" for pv, (lo, hi) in summary["rel_l1"].items())
    agrees = summary["faster"][summary["auto"]] == summary["points"]
    verdict = "agrees with every point" if agrees else "does NOT agree with every point: revisit SLASettings.resolve"
    return (
        f"P.V precision: pv_precision='auto' takes {summary['auto']} on this GPU; lower total in this run: {counts} "
        f"of {summary['points']} shape/topk points ({verdict}); rel-L1 at L=8192: {errors or 'not measured'}."
    )


def bench_shape(b, h, l, d, name, blocks, sage, sweep, parts) -> tuple[list[Row], list[dict], list[dict]]:
    """Dense baselines once, then ours at each topk and P.V precision, with accuracy and stage times; then the
    trainable SLA's forward and forward+backward against SDPA's (``parts``: "inference", "train" or both)."""
    shape = f"B{b} H{h} L{l} D{d} ({name})"
    flops = 4 * b * h * l * l * d
    q, k, v = inputs(b, h, l, d)
    proj = (torch.randn(d, d, device="cuda") * 0.02, torch.randn(d, device="cuda") * 0.02)
    accurate = b * h * l <= 16 * 2 * 32760
    rows, stage_rows, train_stage_rows = [], [], []
    if "inference" in parts:
        dense = {}
        for label, backend in (
            ("SDPA flash", SDPBackend.FLASH_ATTENTION),
            ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
        ):
            try:
                with sdpa_kernel(backend):
                    dense[label] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
            except RuntimeError as err:
                print(f"{label} unavailable: {err}")
        best = min(dense.values())
        rows += [Row(shape, None, label, ms, flops / ms / 1e9, best / ms) for label, ms in dense.items()]
        if sage:
            from sageattention import sageattn

            k_copy = k.clone()  # sageattn 1.0.6 subtracts the K mean in place
            ms = bench(lambda: sageattn(q, k_copy, v, tensor_layout="HND"))
            rows.append(Row(shape, None, "sageattention 1.0.6", ms, flops / ms / 1e9, best / ms))
        out = torch.empty_like(q)
        for topk in TOPKS:
            for pv in PVS:
                ms = bench(lambda topk=topk, pv=pv: ours(q, k, v, topk, pv, proj, out, blocks))
                err = accuracy(h, d, topk, pv, blocks) if accurate else (None, None)
                rows.append(Row(shape, topk, ours_label(pv), ms, flops / ms / 1e9, best / ms, *err))
                st = stages(q, k, v, topk, pv, proj, blocks, sweep=sweep and topk == TOPKS[0])
                kernel_ms = st["sparse+linear"]
                rows.append(
                    Row(shape, topk, f"  kernel only (P.V {pv})", kernel_ms, flops / kernel_ms / 1e9, best / kernel_ms)
                )
                stage_rows.append({"shape": shape, "topk": topk, "pv": pv, "total": ms, **st})
            peer = reference_sagesla(d, topk, proj)
            if peer is not None:
                with torch.no_grad():
                    ms = bench(lambda peer=peer: peer(q, k, v))
                rows.append(Row(shape, topk, REFERENCE_SAGESLA, ms, flops / ms / 1e9, best / ms))
    if "train" in parts:
        train, train_stage_rows = train_rows(q, k, v, shape, flops, proj, accurate, sweep)
        rows += train
    return rows, stage_rows, train_stage_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--blocks", default="64x128", help="BQxBK of ours")
    parser.add_argument("--sweep", action="store_true", help="also time the kernels' warps/stages options")
    parser.add_argument(
        "--part", default="all", choices=("all", "inference", "train"), help="SageSLA inference and/or SLA training"
    )
    args = parser.parse_args()
    parts = ("inference", "train") if args.part == "all" else (args.part,)
    blocks = tuple(int(x) for x in args.blocks.split("x"))
    gpu = torch.cuda.get_device_name()
    header = run_header(gpu, blocks=args.blocks)
    print(" | ".join(f"{k}: {v}" for k, v in header.items()))
    sage = importlib.util.find_spec("sageattention") is not None
    rows: list[Row] = []
    stage_rows: list[dict] = []
    train_stage_rows: list[dict] = []
    for b, h, l, d, name in SHAPES[:1] if args.quick else SHAPES:
        shape_rows, shape_stages, shape_train = bench_shape(b, h, l, d, name, blocks, sage, args.sweep, parts)
        rows += shape_rows
        stage_rows += shape_stages
        train_stage_rows += shape_train
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
            "total, CUDA graph",
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
                f"{s['total (graph)']:.3f}",
                f"{s['prep']:.3f}",
                f"{s['kv_stats']:.3f}",
                f"{s['quant_qk']:.3f}",
                f"{s['quant_v']:.3f}",
                f"{s['select']:.3f}",
                f"{s['sparse']:.3f}",
                f"{s['sparse+linear']:.3f}",
                f"{1 - s['sparse'] / s['total (graph)']:.0%}",
            ]
            for s in stage_rows
        ],
    )
    sweeps = [
        f"{s['shape']} P.V {s['pv']}: " + ", ".join(f"{k.split()[-1]} {v:.3f}" for k, v in s.items() if " w" in k)
        for s in stage_rows
        if any(" w" in k for k in s)
    ]
    train_stage_table = markdown_table(
        [
            "shape",
            "topk",
            "fwd+bwd ms",
            "select",
            "fwd kernel (no linear)",
            "bwd linear q-side",
            "inverse index",
            "bwd dq+dkv (no linear)",
            "linear branch ours / torch autograd",
            "held MiB ours / SDPA",
        ],
        [
            [
                s["shape"],
                s["topk"],
                f"{s['fwd+bwd']:.3f}",
                f"{s['select']:.3f}",
                f"{s['fwd kernel']:.3f} ({s['fwd kernel, no linear']:.3f})",
                f"{s['bwd linear q-side']:.3f}",
                f"{s['inverse index']:.3f}",
                f"{s['bwd dq+dkv']:.3f} ({s['bwd dq+dkv, no linear']:.3f})",
                f"{s['linear ours fwd+bwd']:.3f} / {s['linear torch autograd fwd+bwd']:.3f}",
                f"{s['held MiB']:.0f} / {s['held MiB SDPA']:.0f}",
            ]
            for s in train_stage_rows
        ],
    )
    sweeps += [
        f"{s['shape']} SLA training: " + ", ".join(f"{k} {v:.3f}" for k, v in s.items() if k.endswith(TRAIN_SWEEP_KEYS))
        for s in train_stage_rows
        if any(k.endswith(TRAIN_SWEEP_KEYS) for k in s)
    ]
    pv_auto = pv_auto_summary(stage_rows, rows, SLASettings().resolve(torch.device("cuda")).pv_precision)
    notes = [pv_auto_line(pv_auto)] if pv_auto["points"] else []
    peers = {
        "sageattention": sage,
        "thu-ml's SageSLA on spas_sage_attn": any(r.op == REFERENCE_SAGESLA for r in rows),
    }
    missing = [name for name, found in peers.items() if not found]
    if missing and "inference" in parts:
        notes.append(f"Peers without a row (not installed here): {', '.join(missing)}.")
    print(table)
    print()
    print(stage_table)
    print()
    print(train_stage_table)
    print("\n".join([*notes, *sweeps]))
    payload = {"rows": [asdict(r) for r in rows], "stages": stage_rows, "train_stages": train_stage_rows}
    write_report(
        pathlib.Path(args.out_dir) / f"{gpu_tag(gpu)}-attention",
        header,
        {**payload, "pv_auto": pv_auto} if pv_auto["points"] else payload,
        "\n\n".join((table, stage_table, *notes, train_stage_table, *sweeps)),
    )


if __name__ == "__main__":
    main()
