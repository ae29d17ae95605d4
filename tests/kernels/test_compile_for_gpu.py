"""Every Triton kernel compiles for the H100 (sm90) on this CPU machine: ``scripts/compile_check.py``.

The interpreter runs the kernels' logic but not the GPU compiler's checks: a ``tl.dot`` of fp16 and bf16 operands
runs under the interpreter (its dots take fp32) and fails only on the GPU. Compiling each launch
with the wheel's own ptxas catches such errors in CI. It also reports where ptxas serializes Hopper's matrix
instructions (a performance note, not an error).
"""

import pathlib
import re
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "compile_check.py"
INFERENCE = (
    "kv_stats_kernel",
    "kv_stats_finish_kernel",
    "quant_block_kernel",
    "select_blocks_kernel",
    "quant_v_fp8_kernel",
    "sparse_attn_fwd",
)
TRAINING = ("sla_train_fwd_kernel", "sla_train_bwd_dq_kernel", "sla_train_bwd_dkv_kernel", "linear_attn_bwd_q_kernel")


@pytest.mark.parametrize(
    "dtype,head_dim,only",
    [("bfloat16", 128, None), ("float16", 128, None), ("bfloat16", 64, "inference")],
)
def test_kernels_compile_for_sm90(dtype, head_dim, only):
    argv = [sys.executable, str(SCRIPT), "--head-dims", str(head_dim), "--dtype", dtype, "--length", "1000"]
    run = subprocess.run(argv + (["--only", only] if only else []), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = {line.split()[0] for line in run.stdout.splitlines()[1:]}
    expected = INFERENCE + (() if only else TRAINING)
    assert all(any(name.startswith(kernel) for name in compiled) for kernel in expected), run.stdout
    assert all(f"DP={head_dim}" in line for line in run.stdout.splitlines()[1:] if "select_blocks" not in line)
    # Hopper's register cap reaches the compiler for the FP8 sparse kernel only (bf16 P.V spills under it).
    sparse = [line for line in run.stdout.splitlines() if line.startswith("sparse_attn_fwd_kernel")]
    assert sparse and all(("maxnreg=168" in line) == ("PV_FP8" in line) for line in sparse), sparse
    # ptxas's wgmma serialization notes come through as one field of known codes
    notes = [word for line in run.stdout.splitlines() for word in line.split() if word.startswith("wgmma")]
    assert all(re.fullmatch(r"wgmma-serialized:C751\d(,C751\d)*", word) for word in notes), notes
