#!/usr/bin/env bash
# GPU check, for a lent GPU's short lease: the CUDA / Triton parity tests, then the benchmark
# report (the main job, which also checks every candidate's output and gradients against the
# float64 reference), then a profile of device vs wall time (bench/gpu_profile.py); everything
# goes to the folder given as argument. Each phase has a deadline
# inside SECONDS (default 540) so that what ran is written even when the lease is short.
# The extension is used as found when it already holds the CUDA kernels (one built ahead for the
# machine's torch, carried with the tree); otherwise it is built here (not yet timed on a GPU
# machine: 16 cores there; the one .cu file is the long pole).
# Building it ahead on a CPU machine for the lent H100/H200 (torch 2.11.0+cu130, Python 3.12), as
# session 9 did (4.5 min on 2 cores; the .so is ~35 MB, git-ignored: pass it to the device
# tool's carry):
#   python3.12 -m venv /tmp/v312 && /tmp/v312/bin/pip install torch==2.11.0 ninja pybind11 numpy setuptools
#   mkdir -p /tmp/gpubuild && git archive HEAD | tar -x -C /tmp/gpubuild && cd /tmp/gpubuild &&
#     FASTCTX_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=2 /tmp/v312/bin/python setup.py -q build_ext --inplace
#   cp /tmp/gpubuild/fastctx/_C.cpython-312-x86_64-linux-gnu.so fastctx/
# Usage: bash bench/gpu_check.sh OUT_DIR [SECONDS]
#   PARITY_SECONDS  the parity tests' deadline (default 150; they took 78 s on an H200)
#   PARITY_TESTS    the test files (default: every op's)
#   BENCH_ARGS      more arguments for `fastctx bench --quick` (e.g. "--dtypes fp32")
#   PROFILE_SECONDS kept for the profile after the report (default 60; 0 leaves it out)
#   CEILINGS=0      leave out the copy / matmul ceilings (measured once per machine kind)
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUT_DIR [SECONDS]}
BUDGET=${2:-540}
PARITY_SECONDS=${PARITY_SECONDS:-150}
PROFILE_SECONDS=${PROFILE_SECONDS:-60}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD FASTCTX_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
left() { local n=$((BUDGET - SECONDS - ${1:-0})); echo $((n > 10 ? n : 10)); }  # at least 10 s
status=0
{
  echo "== environment"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))'
  echo "== extension"
  if $PY -c 'import sys; from fastctx import _ext; sys.exit(0 if _ext.has_kernel("cc_fwd", "CUDA") else 1)'; then
    echo "using the extension found in the tree (it holds the CUDA kernels)"
  else
    echo "building"; time MAX_JOBS=16 $PY setup.py -q build_ext --inplace
  fi
  if [ "${CEILINGS:-1}" != 0 ]; then
    echo "== ceilings (device-to-device copy; matrix products, random data)"
    timeout 60 $PY bench/gpu_ceilings.py
  fi
} 2>&1 | tee "$OUT/build.log"

echo "== parity tests, CUDA and Triton ($(left) s, at most $PARITY_SECONDS)"
XDIST=""
$PY -c 'import xdist' 2>/dev/null && XDIST="-n 8"
TIMEOUT_PER_TEST=""
$PY -c 'import pytest_timeout' 2>/dev/null && TIMEOUT_PER_TEST="--timeout 120"
t=$(left); [ "$t" -gt "$PARITY_SECONDS" ] && t=$PARITY_SECONDS
# shellcheck disable=SC2086  # PARITY_TESTS is a list of files
timeout "$t" $PY -m pytest -v -rfE $XDIST $TIMEOUT_PER_TEST -k "cuda or triton" \
  --junitxml="$OUT/parity.xml" ${PARITY_TESTS:-tests/test_criss_cross.py tests/test_criss_cross_triton.py \
  tests/test_region_attention.py tests/test_interlaced.py tests/test_interlaced_triton.py tests/test_pyramid.py \
  tests/test_spatial_gather.py tests/test_semantic_pool.py tests/test_backends.py} > "$OUT/parity.log" 2>&1
[ $? = 0 ] || status=1
grep -oE " (PASSED|FAILED|ERROR|SKIPPED) " "$OUT/parity.log" | sort | uniq -c
grep -E " (FAILED|ERROR) " "$OUT/parity.log" | head -30
tail -2 "$OUT/parity.log"

echo "== benchmark report ($(left "$PROFILE_SECONDS") s)"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
timeout "$(left "$PROFILE_SECONDS")" $PY -m fastctx bench --quick ${BENCH_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
if [ "$PROFILE_SECONDS" != 0 ]; then
  echo "== profile, float16 forward+backward: device vs wall time ($(left) s)"
  timeout "$(left)" $PY bench/gpu_profile.py --dtype fp16 --out "$OUT/profile.json" 2>&1 | grep -v USDT > "$OUT/profile.log"
  grep -E "wall" "$OUT/profile.log"
fi
echo "== report: failures and targets"
grep -E "FAILED|error:" "$OUT/bench.log" | head -20
[ -f "$OUT/report.md" ] && sed -n '/^## Targets/,$p' "$OUT/report.md" | cut -c1-200
exit $status
