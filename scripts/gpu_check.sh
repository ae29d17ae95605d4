#!/usr/bin/env bash
# One call on the GPU machine: install sagesla (and carried wheels), run the GPU tests, then the benchmarks.
# Usage (device tool): SAGESLA_GIT_SHA=$(git rev-parse --short HEAD) bash scripts/gpu_check.sh [bench args...]
# (the sha is read here and written into the command); results land in $OUT (default ./out).
# SKIP_TESTS=1 / SKIP_BENCH=1 / SKIP_PATCH=1 / SKIP_CALIB=1 / SKIP_E2E=1 skip a part; LIMIT=seconds caps each part.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout "${LIMIT:-900}" python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    timeout "${LIMIT:-900}" python3 scripts/bench_attention.py --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
fi
if [ "${SKIP_PATCH:-0}" != 1 ]; then
    timeout "${LIMIT:-900}" python3 scripts/patch_wan_check.py --topk 0.1 2>&1 | tee "$OUT/patch-wan.log" | tail -30
fi
if [ "${SKIP_CALIB:-0}" != 1 ]; then
    timeout "${LIMIT:-900}" python3 scripts/calibrate_wan_check.py --out "$OUT/wan13b-random.profile.safetensors" 2>&1 \
        | tee "$OUT/calibrate-wan.log" | tail -25
fi
if [ "${SKIP_E2E:-0}" != 1 ]; then
    timeout "${LIMIT:-900}" python3 scripts/bench_e2e.py --compile --out-dir "$OUT" 2>&1 | tee "$OUT/e2e.log" | tail -15
fi
