"""Compile the Triton kernels (inference pipeline and trainable SLA) for a GPU architecture without a GPU.

Usage:
    python scripts/compile_check.py [--arch 90] [--head-dims 64 128] [--length 4095] [--dtype bfloat16]

Runs the launchers on CPU tensors with the interpreter off and every kernel launch replaced by
``triton.compile`` for ``cuda:<arch>`` (the wheel's own ptxas), then prints each variant's registers, spill stack
and shared memory from ``cuobjdump``. A kernel that the GPU compiler rejects fails here, before a GPU is involved
(the interpreter cannot see such errors, e.g. ``tl.dot`` operands of two dtypes, which its fp32 dots accept);
spills (STACK > 0) on the default path are a performance bug unless they stay outside the hot loop. On sm90 it
also prints ``wgmma-serialized:C75xx`` when ptxas makes each Hopper matrix instruction wait for the previous one.
The FP8 sparse kernel is serialized: under its register cap three programs fit an SM, which beats two with
pipelined products (benchmarks/experiments.md, "Sparse loop: register cap and occupancy"). Pointer and stride
arguments are assumed 16-byte aligned, as they are for contiguous tensors. To check another triton (e.g. the GPU
image's 3.6.0), put its wheel first on PYTHONPATH.
"""

import argparse
import os
import pathlib
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from sagesla.kernels import sparse_attn  # noqa: E402
from sagesla.kernels.kv_stats import kv_stats  # noqa: E402
from sagesla.kernels.linear_attn_train import linear_attn_bwd_q, linear_state  # noqa: E402
from sagesla.kernels.sla import sla_forward  # noqa: E402
from sagesla.kernels.sparse_attn_train import sparse_attn_train_bwd, sparse_attn_train_fwd  # noqa: E402

TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.int8: "i8",
    torch.float8_e4m3fn: "fp8e4nv",
}


def _signature(kernel: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """Triton signature, constexprs and divisibility attributes of one launch."""
    # positional arguments first, constexprs by keyword
    values = dict(zip(kernel.arg_names, args, strict=False)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr or value is None:  # a None argument is a compile-time None, as in triton's launcher
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, TensorDescriptor):
            block = ", ".join(map(str, value.block_shape))
            signature[param.name] = f"tensordesc<{TYPES[value.base.dtype]}[{block}]>"
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i64" if abs(value) >= 2**31 else "i32"
            if value and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _wheel_tool(name: str) -> pathlib.Path:
    """A CUDA binary shipped in the triton wheel (ptxas, cuobjdump): the compiler the kernels are built with."""
    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _usage(cubin: bytes) -> str:
    """REG / STACK of a cubin, from the wheel's cuobjdump."""
    tool = _wheel_tool("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next((x for x in dump.splitlines() if "REG:" in x), "")
    return " ".join(w for w in line.split() if w.startswith(("REG:", "STACK:")))


def _wgmma_serialization(ptx: str, arch: int) -> str:
    """ptxas's notes on serialized Hopper matrix instructions (info C7510-C7519), e.g. C7515 (a non-wgmma
    instruction writes accumulator registers inside a pipeline stage) or C7512 (too few registers): each wgmma then
    waits for the previous one. Empty when the kernel has none or the target has no wgmma. Runs ptxas a second time
    on the same PTX: ``triton.compile`` does not return ptxas's log."""
    if arch != 90:
        return ""
    tool = _wheel_tool("ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run(
            [tool, "-arch=sm_90a", "-v", str(src), "-o", str(src.with_suffix(".cubin"))], capture_output=True, text=True
        ).stderr
    codes = sorted(set(re.findall(r"\((C751\d)\) Potential Performance Loss: wgmma", log)))
    return f"wgmma-serialized:{','.join(codes)}" if codes else ""


def install_compiler(arch: int) -> None:
    """Make every ``kernel[grid](...)`` compile for ``cuda:arch`` and print its resource use instead of running."""

    def getitem(kernel: JITFunction, grid):
        def launch(*args, num_warps=4, num_stages=3, maxnreg=None, **kwargs):
            signature, constexprs, attrs = _signature(kernel, args, kwargs)
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            options = {"num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg}
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
            flags = [k for k, v in constexprs.items() if v is True]
            fields = [
                f"{kernel.fn.__name__:26s} DP={constexprs.get('DP')} warps={num_warps} stages={num_stages}",
                f"maxnreg={maxnreg}" if maxnreg else "",
                _usage(compiled.asm["cubin"]),
                f"smem={compiled.metadata.shared}",
                _wgmma_serialization(compiled.asm["ptx"], arch),
                *flags,
            ]
            print(" ".join(f for f in fields if f))

        return launch

    JITFunction.__getitem__ = getitem
    # launch options chosen per device (e.g. the sparse kernel's register cap) follow the target architecture
    sparse_attn.device_capability = lambda device: divmod(arch, 10)


def check_inference(head_dim: int, length: int, dtype: torch.dtype) -> None:
    """Launch the SageSLA forward's kernels once per P.V precision, with and without the linear branch."""
    q = k = v = out = torch.zeros(1, 2, length, head_dim, dtype=dtype)
    weight, bias = torch.zeros(head_dim, head_dim), torch.zeros(head_dim)
    for pv_precision in ("fp8", "half"):
        for proj in ((weight, bias), (None, None)):
            sla_forward(
                q,
                k,
                v,
                topk=0.1,
                block_q=64,
                block_k=128,
                sm_scale=0.1,
                quantized=True,
                pv_precision=pv_precision,
                feature_map="softmax",
                linear_scope="all",
                proj_weight=proj[0],
                proj_bias=proj[1],
                out=out,
            )


def check(head_dim: int, length: int, dtype: torch.dtype) -> None:
    """Launch every variant of the training kernels once (scopes none, bias only, all, complement)."""
    bq = bk = 64
    q = k = v = out = torch.zeros(1, 2, length, head_dim, dtype=dtype)
    kv_stats(k, v, False, "softmax")  # the training forward's K/V reduction (no V maxima)
    lut = torch.zeros(1, 2, triton.cdiv(length, bq), 3, dtype=torch.int32)
    weight, bias = torch.zeros(head_dim, head_dim), torch.zeros(head_dim)
    state = linear_state(torch.zeros(1, 2, head_dim, head_dim), torch.zeros(1, 2, head_dim), weight)
    for scope in ("none", "bias", "all", "complement"):
        linear = state if scope in ("all", "complement") else None
        b = None if scope == "none" else bias
        complement = scope == "complement"
        lse = sparse_attn_train_fwd(q, k, v, lut, bq, bk, 0.1, out, linear=linear, bias=b, complement=complement)
        grads = None
        if linear is not None:
            grads = linear_attn_bwd_q(q, k, v, out, out, b, lut, state, weight, "softmax", complement, bq, bk)
        bias_only = b if grads is None else None
        sparse_attn_train_bwd(
            q, k, v, out, lse, out, lut, bq, bk, 0.1, linear=grads, bias=bias_only, complement=complement
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--length", type=int, default=4095, help="L (odd: the masked-tail variants)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"), help="compute dtype")
    parser.add_argument("--only", choices=("inference", "training"), help="one kernel family (default: both)")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, cuda:{args.arch}, {args.dtype}")
    install_compiler(args.arch)
    for head_dim in args.head_dims:
        if args.only != "training":
            check_inference(head_dim, args.length, getattr(torch, args.dtype))
        if args.only != "inference":
            check(head_dim, args.length, getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
