#!/usr/bin/env bash
# One lent GPU's whole check, as one command of at most 9.5 minutes (the device tool: one command
# per lease is cheapest; it returns at most 8 files, so everything goes into OUT/results.tgz,
# rewritten after each phase, and a command stopped at its limit keeps what finished):
#   1. bench/gpu_check.sh: the CUDA / Triton parity tests, then the report's semantic pool,
#      spatial gather and region attention cases first (their CUDA C++ kernels run there for the
#      first time: bench/gpu_notes.md), then criss-cross, interlaced attention and ISA block
#      (float16 and float32);
#   2. bench/line_sweep.py: the line engine's candidate configs side by side;
#   3. fastctx bench --ops models_full: mmseg's Cityscapes-size training step (issue 6);
#   4. bench/gpu_heads.sh: the toolbox heads before / after fastctx.swap, full size (issue 7).
# Device tool: carry [".whl", "fastctx/_C.cpython-312-x86_64-linux-gnu.so"] (the extension built
# ahead: bench/gpu_check.sh's header; the wheels: bench/gpu_heads.sh --fetch), timeout_s 600:
#   FASTCTX_COMMIT=<commit> bash bench/gpu_lease.sh "$OUT"
OUT=${1:?usage: bench/gpu_lease.sh OUT_DIR}
W=/tmp/lease
mkdir -p "$W"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
pack() { tar czf "$OUT/results.tgz" -C "$W" .; }
PARITY_SECONDS=100 CEILINGS=0 PROFILE_SECONDS=0 \
  BENCH_ARGS="--ops semantic_pool,spatial_gather,region_attention,criss_cross_attention,interlaced_attention,isa_block" \
  bash bench/gpu_check.sh "$W/check" 200
pack
timeout 110 python3 bench/line_sweep.py --seconds 95 --out "$W/sweep.json" 2>&1 | tee "$W/sweep.log"
pack
timeout 120 python3 -m fastctx bench --quick --ops models_full --dtypes fp32 --out "$W/models" 2>&1 | tee "$W/models.log"
pack
[ -d .whl ] && timeout 140 bash bench/gpu_heads.sh "$W"
pack
