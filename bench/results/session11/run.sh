#!/usr/bin/env bash
# Session 11's second GPU lease (one command, about 7 minutes): parity of the criss-cross and
# interlaced kernels (the engine's new scratch backward is interlaced attention's default), the
# line-engine config sweep (bench/line_sweep.py), issue 6's mmseg-size training step
# (models_full), then the report's interlaced attention and ISA block cases.
# Usage (device tool, the extension built ahead for torch 2.11 / Python 3.12 carried along):
#   bash bench/results/session11/run.sh "$OUT"
OUT=${1:?OUT}
cd "$(dirname "$0")/../../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PARITY_SECONDS=70 CEILINGS=0 PROFILE_SECONDS=0 \
  PARITY_TESTS="tests/test_interlaced_triton.py tests/test_interlaced.py tests/test_criss_cross_triton.py tests/test_criss_cross.py" \
  BENCH_ARGS="--ops interlaced_attention --dtypes fp16" bash bench/gpu_check.sh "$OUT/check" 150
timeout 130 python3 bench/line_sweep.py --seconds 115 --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log"
timeout 150 python3 -m fastctx bench --quick --ops models_full --dtypes fp32 --out "$OUT/models" 2>&1 | tee "$OUT/models.log"
