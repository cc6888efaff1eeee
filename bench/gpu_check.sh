#!/usr/bin/env bash
# GPU check: on a machine with CUDA, build the extension (CUDA kernels included), run the parity
# suite on CUDA, then the benchmark report; everything goes to the folder given as argument.
# Usage: bash bench/gpu_check.sh OUT_DIR   (meant to finish in under 8 minutes on an H100)
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD FASTCTX_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
{
  echo "== environment"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
  echo "== build"; time MAX_JOBS=16 $PY setup.py -q build_ext --inplace
} 2>&1 | tee "$OUT/build.log"
status=0
echo "== parity (CUDA)"
timeout 300 $PY -m pytest -q --junitxml="$OUT/parity.xml" tests/test_criss_cross.py tests/test_region_attention.py \
  tests/test_interlaced.py tests/test_interlaced_triton.py tests/test_pyramid.py tests/test_spatial_gather.py \
  tests/test_semantic_pool.py tests/test_backends.py 2>&1 | tee "$OUT/parity.log" || status=1
echo "== benchmark"
timeout 240 $PY -m fastctx bench --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
