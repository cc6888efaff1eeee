# fastctx: the two quick-start commands are `make report` and `make test` (see README.md).
# Both create .venv, install the dependencies, build the extension in place, then run.

PYTHON ?= python3
VENV   ?= .venv
# A CUDA 13 build of torch: with it the CUDA sources compile (and link) even on a machine without
# a GPU, so a broken .cu fails the build. torch==2.13.0 is the CPU-only build.
TORCH  ?= torch==2.14.1
PY      = $(VENV)/bin/python
REPORT ?= fastctx-report
# Test-only: the segmentation toolboxes that tests/test_swap.py and tests/test_integrations_*.py
# build real models with. fastctx never imports them (a test proves it); tests/toolboxes.py
# says how the tests import them. Pinned: mmcv-lite 2.2.0 fails mmseg 1.2.2's version assert;
# mmseg.models imports ftfy and regex. sssegmentation goes in without its ~20 requirements:
# the segmentors need dill and tqdm, its segmentor registry torchvision (the SAM segmentors).
# TORCHVISION must be the release built for TORCH (pip refuses a mismatch instead of swapping
# torch).
TORCHVISION ?= torchvision==0.29.1
TOOLBOXES = mmsegmentation==1.2.2 mmcv-lite==2.1.0 mmengine==0.10.7 ftfy regex dill tqdm

.PHONY: install report report-full report-heads report-heads-quick test clean

$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" ninja pybind11 numpy pytest pytest-benchmark setuptools wheel
	touch $@

# mmsegmentation's wheel also installs a top-level `tests` package that would shadow ours.
$(VENV)/.toolboxes: $(VENV)/.deps
	$(PY) -m pip install -q "$(TORCH)" "$(TORCHVISION)" $(TOOLBOXES)
	$(PY) -m pip install -q --no-deps --no-build-isolation sssegmentation==1.7.0
	rm -rf "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tests"
	touch $@

# Build fastctx._C next to the sources (ninja: only what changed is rebuilt) and put the checkout
# on the venv's path, so `python -m fastctx` and `import fastctx` use this tree.
install: $(VENV)/.deps
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext --inplace
	echo "$(CURDIR)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fastctx-dev.pth"

# The main job: the benchmark-and-parity report on whatever device is present (6.6-6.7 min on a
# 2-core CPU, measured: bench/results/cpu-epyc-2threads-session{7,8}/README.md).
report: install
	$(PY) -m fastctx bench --quick --out $(REPORT)

# The same with full repetitions.
report-full: install
	$(PY) -m fastctx bench --out $(REPORT)

# The toolbox heads (mmseg, sssegmentation) before and after fastctx.swap: time, peak memory,
# parity (bench/heads.py; the toolboxes are test-only). Full size: B=2, 64x128 features at the
# Cityscapes widths (long on a 2-core CPU); -quick: 33x65 features, widths / 8.
report-heads: install $(VENV)/.toolboxes
	$(PY) bench/heads.py --out fastctx-heads-report

report-heads-quick: install $(VENV)/.toolboxes
	$(PY) bench/heads.py --quick --out fastctx-heads-report

test: install $(VENV)/.toolboxes
	$(PY) -m pytest -q tests

clean:
	rm -rf build fastctx/_C*.so $(REPORT)
