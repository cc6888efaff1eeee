#!/usr/bin/env bash
# Session 11's second GPU lease (one command, about 7 minutes): parity of the criss-cross and
# interlaced kernels (the engine's new scratch backward is interlaced attention's default) and the
# report's interlaced cases in float16, the line-engine config sweep (bench/line_sweep.py), then
# issue 6's mmseg-size training step (models_full). The device tool returns at most 8 files: every
# phase's results go into one archive, OUT/results.tgz, rewritten after each phase.
# Usage (device tool, the extension built ahead for torch 2.11 / Python 3.12 carried along):
#   bash bench/results/session11/run.sh "$OUT"
OUT=${1:?OUT}
W=/tmp/session11
mkdir -p "$W"
cd "$(dirname "$0")/../../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
pack() { tar czf "$OUT/results.tgz" -C "$W" .; }
PARITY_SECONDS=70 CEILINGS=0 PROFILE_SECONDS=0 \
  PARITY_TESTS="tests/test_interlaced_triton.py tests/test_interlaced.py tests/test_criss_cross_triton.py tests/test_criss_cross.py" \
  BENCH_ARGS="--ops interlaced_attention --dtypes fp16" bash bench/gpu_check.sh "$W/check" 150
pack
timeout 130 python3 bench/line_sweep.py --seconds 115 --out "$W/sweep.json" 2>&1 | tee "$W/sweep.log"
pack
timeout 150 python3 -m fastctx bench --quick --ops models_full --dtypes fp32 --out "$W/models" 2>&1 | tee "$W/models.log"
pack
