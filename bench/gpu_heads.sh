#!/usr/bin/env bash
# Issue 7's heads benchmark on a lent GPU: the toolbox heads (mmsegmentation 1.2.2, sssegmentation
# 1.7.0) before and after fastctx.swap, bench/heads.py --device cuda. The GPU machine has no
# package registry; its image already holds what the toolboxes import from the wider world
# (opencv-python-headless, matplotlib, scipy, pandas, rich, pyyaml, tqdm, regex, pillow,
# torchvision), so only the toolboxes and their small pure-Python requirements travel, as
# wheels (~5 MB) in the git-ignored folder .whl, carried with the extension built ahead:
#
#   here, once:   bash bench/gpu_heads.sh --fetch      (into .whl/, listed in .git/info/exclude)
#   device tool:  carry [".whl", "fastctx/_C.cpython-312-x86_64-linux-gnu.so"],
#                 command: bash bench/gpu_heads.sh "$OUT" [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch" ]; then
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  mkdir -p .whl
  plat=(--only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  python3 -m pip download -q --no-deps "${plat[@]}" -d .whl mmsegmentation==1.2.2 mmcv-lite==2.1.0 \
    mmengine==0.10.7 ftfy wcwidth addict yapf platformdirs termcolor prettytable dill
  # sssegmentation publishes an sdist only: a wheel of it, built here
  python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl sssegmentation==1.7.0
  ls .whl
  exit 0
fi
OUT=${1:?usage: bench/gpu_heads.sh OUT_DIR [--quick] | --fetch}
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
rm -rf /tmp/site/tests  # mmsegmentation's wheel installs a top-level `tests` that would shadow ours
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
python3 bench/heads.py --device cuda --out "$OUT/heads" "$@" 2>&1 | tee "$OUT/heads.log"
