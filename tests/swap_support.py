"""The build-copy-swap-compare machinery of the swap tests (tests/test_swap.py, test_swap_ann.py,
test_swap_isa.py, test_swap_ocr.py).

A parity test runs a copy of the original and a swapped copy on the same input and upstream
gradient (:func:`run`), and compares the output, the gradient of the input and of every parameter,
and the buffers (BN running statistics in train mode):

- float64, :func:`compare_runs`: swapped against the original, relative error <= 1e-5 (the
  issue's target). This is the exactness test.
- float32, :func:`compare_runs` (tests/test_swap.py) or :func:`compare_runs32` (the other swap
  tests, whose heads are deeper): against the original run in float32, with the documented
  fallbacks of :func:`compare_runs32` where float32 rounding, not the swap, makes the two differ.

:func:`parity` runs both dtypes for one model; :func:`assert_matters` shows that what was compared
depends on the swapped module (so that the comparison could fail).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Callable, Iterable, Iterator

import pytest
import torch
from torch import nn

import fastctx
from fastctx.swap import SwapError, swap
from tests import toolboxes
from tests._utils import assert_close


@pytest.fixture(scope="module", name="mmseg")
def mmseg_fixture():
    """The fixture ``mmseg`` (import ``mmseg_fixture`` into a test module): mmsegmentation,
    imported through tests/toolboxes.py (FAILS when it is missing)."""
    return toolboxes.mmseg()


def paths(report) -> list[tuple[str, str, str | None]]:
    """``(path, original class, replacement class)`` of every swapped module of a SwapReport."""
    return [(e.path, e.original, e.replacement) for e in report.swapped]


# ---------------------------------------------------------------------------------------------
# running and comparing
# ---------------------------------------------------------------------------------------------


#: Below NOISE[dtype] * (the largest quantity compared in a run), an expected value is a sum
#: that cancels to rounding level: key_conv.bias's gradient is exactly 0 (a constant added to
#: every key of a softmax row changes nothing); gamma's is a sum over the ~10^6 elements of a
#: 2x64x97x97 map that cancels to ~1e-4 of the largest gradient (measured in the 97x97 train
#: run: 0.033 against 464, where the original and the swapped head in float32 are 2.7e-5 and
#: 4.2e-5 off the float64 value, and 6.9e-5 apart). Such a value must be matched to that level.
NOISE = {torch.float64: 1e-8, torch.float32: 1e-4}


def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str,
          scale: float = 0.0) -> None:
    """``actual`` against ``expected`` (both computed in ``dtype``): relative error <= 1e-5 in
    float64 (the issue's target: max|actual - expected| / max|expected|), the dtype's row of
    fastctx.testing otherwise; an expected tensor at noise level (see NOISE) must be matched by
    an actual one at noise level."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not a.isnan().any(), f"{name}: NaN"
    err = float((a - e).abs().max())
    noise = NOISE[dtype] * scale
    if float(e.abs().max()) <= noise:
        assert err <= noise, f"{name}: expected zero up to rounding ({noise:.3g}), off by {err:.3g}"
    elif dtype == torch.float64:
        rel = err / float(e.abs().max())
        assert rel <= 1e-5, f"{name}: relative error {rel:.3g} > 1e-05"
    else:
        assert_close(actual, e, dtype, name)


def run(model: nn.Module, x: torch.Tensor, dout: torch.Tensor, seed: int, forward=None):
    """Forward (dropout drawn from ``seed``) and backward with ``dout``; returns the output,
    the gradients of x and of every parameter (by name) and the buffers."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = (forward or model)(x)
    out.backward(dout.to(out.dtype))
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters()})
    return out.detach(), grads, {n: b.detach().clone() for n, b in model.named_buffers()}


def compare_runs(got, want, dtype, what):
    """``got`` (swapped) against ``want`` (original), both run in ``dtype``."""
    out, grads, bufs = got
    out64, grads64, bufs64 = want
    scale = max(float(t.abs().max()) for t in [out64, *grads64.values()])
    check(out, out64, dtype, f"{what} output", scale)
    assert grads.keys() == grads64.keys()
    for n in grads64:
        assert grads[n] is not None, f"{what}: no gradient for {n}"
        check(grads[n], grads64[n], dtype, f"{what} grad {n}", scale)
    assert bufs.keys() == bufs64.keys()
    for n in bufs64:
        if bufs64[n].is_floating_point():
            check(bufs[n], bufs64[n], dtype, f"{what} buffer {n}")
        else:
            assert torch.equal(bufs[n], bufs64[n]), f"{what} buffer {n}"


# ---------------------------------------------------------------------------------------------
# float32: compare_runs32 and the ReLU flips it may excuse
# ---------------------------------------------------------------------------------------------


#: A float32 tensor of the swapped model may miss the float32 row of fastctx.testing against the
#: original's float32 result when both are long sums that cancel (the gradients of the key and
#: value projections: sums over B * H * W pixels). It must then be at most F32_FACTOR times as far
#: from the float64 result as the original's float32 result is (measured worst: 4.3x, the
#: value projection's BN weight of the OCR cascade at 33x65, at 6.7e-7 of its largest element).
#: As in :func:`check`, an expected gradient at noise level (1e-4 of the largest quantity
#: compared) need only be matched to that level.
F32_FACTOR = 8.0
#: The fused ops' float32 backward sums over the pixels in float32 in their own order (blocked
#: GEMMs; region_attention's dk is a sum over every query pixel of a softmax-backward term that
#: cancels), where the original's matmuls sum in BLAS order: the gradients upstream of the
#: attention may then be more than F32_FACTOR times the original's float32 error off float64
#: with no ReLU flip at all (measured, none flipped, eval mode: the gradient of the key
#: projection's conv weight, 6.2e-4 of its largest element off in the OCR cascade at 33x65, 9x
#: the original's error; 1.8e-4 in the ANN head at 97x97, 30x). A gradient may be up to F32_SUM of its
#: largest float64 element off. (These are the ops' float32 accuracy, which their own tests
#: bound op by op against float64; the float64 comparison here is the exactness test.)
F32_SUM = 2e-3
#: A ReLU whose float32 input rounds across 0 in one model and not the other passes or blocks
#: one gradient element, and every gradient upstream of it moves; in train mode BN's backward
#: spreads it over the channel, and where the ReLU acts on a region / class vector (OCR's key and
#: value projections, ISNet's semantic-level ones in the swapped module) one element stands for
#: every pixel of that region. Measured, each with the swapped model's float64 run matching the
#: original to 1e-5: the OCR cascade at 97x97, train, 1 flip within 6e-7 of 0 in float64: grad x
#: 2.0e-2 of its largest element off (3 flips in an earlier build: 4.3e-3); the ISNet segmentor at
#: 33x65, train, 2 flips within 5e-7 of 0: a bottleneck weight gradient 2.9e-2 of its largest,
#: the original's own float32 error already 1e-3 of it. A float32 tensor beyond the rules above
#: is accepted only when such a flip happened (:class:`ReluFlips`: recorded, few, every one at a
#: float64 pre-activation near 0), and then within F32_FLIP of its largest float64 element.
F32_FLIP = 5e-2
#: A flip counts only where the float64 pre-activation is within FLIP_NEAR of the largest
#: |pre-activation| of that ReLU call (float32 rounding of a few conv / BN layers is ~1e-6 of it).
FLIP_NEAR = 1e-4
#: ... and only when at most FLIP_MOST elements flipped, over all ReLU calls of the run.
FLIP_MOST = 16


@contextlib.contextmanager
def record_relus(model: nn.Module, values: bool) -> Iterator[dict[str, list[torch.Tensor]]]:
    """While open, every call of every ``nn.ReLU`` of ``model`` appends its input (``values``)
    or its sign mask (input > 0) to ``record[name]``, unless an earlier call of that ReLU had the
    same (a module run twice on one tensor, as mmseg's shared key/query projection, counts once);
    ``name`` is the ReLU's path in ``model`` when this is called: hooks registered before a swap
    stay on the ReLU objects that the swapped modules reuse, under the original's names."""
    record: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(name):
        def pre(mod, args):
            x = args[0].detach()
            x = x.clone() if values else x > 0
            calls = record.setdefault(name, [])
            if not any(c.shape == x.shape and torch.equal(c, x) for c in calls):
                calls.append(x)

        return pre

    for name, m in model.named_modules():
        if isinstance(m, nn.ReLU):
            handles.append(m.register_forward_pre_hook(hook(name)))
    try:
        yield record
    finally:
        for h in handles:
            h.remove()


class ReluFlips:
    """The ReLU inputs whose sign differs between the swapped and the original float32 runs
    (``fast32``, ``orig32``: sign masks from :func:`record_relus`), judged against the original's
    float64 inputs (``pre64``): ``excuses`` is True when at least one element flipped, at most
    FLIP_MOST did, each where the float64 input is within FLIP_NEAR of that call's largest, and
    every call could be paired (same ReLUs, same number of calls, same shapes), except the ReLUs
    under the module paths ``reshaped``: those the swapped module runs on other shapes by design
    (ISNet's semantic-level projections run on the K class vectors instead of the pixels), which
    cannot be paired and are listed as such."""

    def __init__(self, fast32, orig32, pre64, reshaped: tuple[str, ...] = ()) -> None:
        self.count, self.far, self.unpaired, self.reshaped, self.nearest = 0, [], [], [], 0.0
        for name in sorted(set(fast32) | set(orig32) | set(pre64)):
            f, o, p = fast32.get(name, []), orig32.get(name, []), pre64.get(name, [])
            if not len(f) == len(o) == len(p) or any(a.shape != b.shape for a, b in zip(f, p)):
                by_design = any(name == r or name.startswith(r + ".") for r in reshaped)
                (self.reshaped if by_design else self.unpaired).append(name)
                continue
            for i, (a, b, v) in enumerate(zip(f, o, p, strict=True)):
                flipped = a != b
                n = int(flipped.sum())
                if n:
                    self.count += n
                    worst = float(v[flipped].abs().max()) / max(float(v.abs().max()), 1e-300)
                    self.nearest = max(self.nearest, worst)
                    if worst > FLIP_NEAR:
                        self.far.append(f"{name} call {i}: {n} flipped, one at {worst:.3g} of the largest")
        self.excuses = 0 < self.count <= FLIP_MOST and not self.far and not self.unpaired

    def __str__(self) -> str:
        return (f"{self.count} ReLU inputs flipped sign between the float32 runs (at most {FLIP_MOST}"
                f" excuse a difference; float64 input at most {self.nearest:.3g} of its largest);"
                f" far from 0 in float64: {self.far or 'none'}; ReLUs not paired between the runs:"
                f" {self.unpaired or 'none'}; run on other shapes by design: {self.reshaped or 'none'}")


def compare_runs32(got, want32, want64, what, flips: ReluFlips | None = None):
    """``got`` (swapped, float32) against ``want32`` (original, float32) and ``want64`` (original,
    float64): outputs, gradients and buffers, by the float32 row, else F32_FACTOR, else (gradients)
    F32_SUM, else (only when ``flips`` excuses it) F32_FLIP."""
    names = [("output", got[0], want32[0], want64[0])]
    assert got[1].keys() == want32[1].keys() == want64[1].keys()
    names += [(f"grad {n}", got[1][n], want32[1][n], want64[1][n]) for n in want64[1]]
    assert got[2].keys() == want32[2].keys()
    for n in want64[2]:
        if not want64[2][n].is_floating_point():
            assert torch.equal(got[2][n], want32[2][n]), f"{what} buffer {n}"
        else:
            names.append((f"buffer {n}", got[2][n], want32[2][n], want64[2][n]))
    scale = max(float(t.abs().max()) for t in [want32[0], *want32[1].values()])
    for name, g, w32, w64 in names:
        assert g is not None, f"{what}: no {name}"
        try:
            check(g, w32, torch.float32, f"{what} {name}", scale if not name.startswith("buffer") else 0.0)
        except (AssertionError, pytest.fail.Exception) as row:
            e_orig = float((w32.double() - w64).abs().max())
            e_fast = float((g.double() - w64).abs().max())
            largest = float(w64.abs().max())
            if e_fast <= F32_FACTOR * e_orig or (name.startswith("grad ") and e_fast <= F32_SUM * largest):
                continue
            flipped = flips if flips is not None else "ReLU flips not recorded"
            assert flips is not None and flips.excuses and e_fast <= F32_FLIP * largest, (
                f"{what} {name}: {e_fast:.3g} off float64 ({e_fast / largest:.3g} of its largest), more"
                f" than {F32_FACTOR} x the original's float32 error {e_orig:.3g}; {flipped}; {row}")


def parity(orig: nn.Module, x: torch.Tensor, dout: torch.Tensor, seed: int,
           forward_of: Callable[[nn.Module], Callable], expected: list, what: str,
           check_swapped: Callable[[nn.Module], None] | None = None, reshaped: tuple[str, ...] = (),
           backend: str | None = None):
    """A copy of ``orig`` against a swapped copy (``swap(strict=True, backend=backend)``), in
    float64 then float32, on input ``x`` and upstream gradient ``dout``, dropout from ``seed``; ``forward_of(model)``
    is the function of the input that runs ``model``. The swap must report ``expected``
    (:func:`paths`) and return the copy itself unless the root is swapped (path ""); then
    ``check_swapped(swapped model)``; ``reshaped``: see :class:`ReluFlips`; ``backend``: swap's.
    Returns the float32 original and its run."""
    pre64 = {}
    for dtype in (torch.float64, torch.float32):
        original = copy.deepcopy(orig).to(dtype)
        with record_relus(original, values=dtype == torch.float64) as orig_relus:
            want = run(original, x.to(dtype), dout, seed, forward=forward_of(original))
        fast = copy.deepcopy(orig).to(dtype)
        with record_relus(fast, values=False) as fast_relus:
            swapped, report = swap(fast, strict=True, backend=backend)
            assert paths(report) == expected
            assert (swapped is fast) == all(path for path, _, _ in expected)
            if check_swapped is not None:
                check_swapped(swapped)
            got = run(swapped, x.to(dtype), dout, seed, forward=forward_of(swapped))
        if dtype == torch.float64:
            compare_runs(got, want, dtype, f"{what} {dtype}")
            want64, pre64 = want, orig_relus
        else:
            flips = ReluFlips(fast_relus, orig_relus, pre64, reshaped)
            compare_runs32(got, want, want64, f"{what} {dtype}", flips)
    return original, want


def assert_matters(zero: Iterable[torch.Tensor], forward: Callable[[], torch.Tensor], want: torch.Tensor,
                   seed: int | None = None) -> None:
    """Zeroing the tensors ``zero`` (in place: e.g. the swapped attention's output projection)
    moves ``forward()`` (dropout from ``seed``) off ``want`` by more than 1e-3 of its largest
    element: what was compared depends on them, so the comparison could fail."""
    with torch.no_grad():
        for t in zero:
            t.zero_()
        if seed is not None:
            torch.manual_seed(seed)
        without = forward()
    assert float((without - want).abs().max()) > 1e-3 * float(want.abs().max())


# ---------------------------------------------------------------------------------------------
# structure differences, look-alikes
# ---------------------------------------------------------------------------------------------


def left_alone_reasons(model: nn.Module) -> dict[str, str]:
    """``swap(model, strict=True)`` raises, changes nothing and swaps nothing; the reasons it
    gives, by path."""
    before = list(model.modules())
    with pytest.raises(SwapError, match="recognised modules could not be swapped") as info:
        swap(model, strict=True)
    assert list(model.modules()) == before and not info.value.report.swapped
    return {e.path: e.reason for e in info.value.report.left_alone}


def assert_look_alike_left_alone(look: nn.Module, recognised: str) -> None:
    """A module of another package with the class name of the recognised class ``recognised``
    is reported as a look-alike, neither swapped nor a reason for strict to raise."""
    model = nn.Sequential(look)
    _, report = swap(model, strict=True)
    assert model[0] is look and not report.swapped
    [entry] = report.look_alikes
    assert entry.original == f"{type(look).__module__}.{type(look).__qualname__}"
    assert recognised in entry.reason


# ---------------------------------------------------------------------------------------------
# the mmseg plugin heads
# ---------------------------------------------------------------------------------------------


def assert_plugin_head_matches(original: nn.Module, fast: nn.Module, inputs: tuple, op: str) -> None:
    """The plugin head ``fast`` (built with ``fastctx_backend="reference"``) has ``original``'s
    state-dict keys, loads its state, and gives its eval logits on ``inputs`` through ``op``."""
    assert list(fast.state_dict()) == list(original.state_dict())
    fast.load_state_dict(original.state_dict(), strict=True)
    original.eval()
    fast.eval()
    with torch.no_grad():
        want, got = original(*inputs), fast(*inputs)
    assert fastctx.last_backend(op) == "reference"
    assert_close(got, want.double(), torch.float32, "logits")


def mmseg_config(mmseg, config: str) -> str:
    """The path of mmseg's config ``config`` (a path under its ``configs``)."""
    return os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", config)


def plugin_configs(mmseg, tmp_path, config: str, head: str, decode_head) -> tuple:
    """mmseg's Cityscapes ``config`` (a path under its ``configs``) with random weights, and a
    user config that inherits it, imports the plugin by ``custom_imports`` and sets
    ``model.decode_head = decode_head``. The plugin is forgotten first, so that what registers
    the plugin head ``head`` is the user config's custom_imports. Returns both Configs."""
    from mmengine.config import Config
    from mmseg.registry import MODELS

    base = mmseg_config(mmseg, config)
    original_cfg = Config.fromfile(base)
    original_cfg.model.pretrained = None  # random weights: nothing to download
    sys.modules.pop("fastctx.integrations.mmseg", None)
    MODELS._module_dict.pop(head, None)
    user_cfg = tmp_path / f"{os.path.basename(config)[:-3]}_fastctx.py"
    user_cfg.write_text(
        f"_base_ = [{base!r}]\n"
        "custom_imports = dict(imports=['fastctx.integrations.mmseg'], allow_failed_imports=False)\n"
        f"model = dict(pretrained=None, decode_head={decode_head!r})\n"
    )
    fast_cfg = Config.fromfile(str(user_cfg))
    assert head in MODELS.module_dict
    return original_cfg, fast_cfg


def assert_same_logits(original: nn.Module, fast: nn.Module, image: torch.Tensor, shape: tuple,
                       zero: Iterable[torch.Tensor]) -> torch.Tensor:
    """The plugin segmentor ``fast`` gives ``original``'s logits (``mode="tensor"``, of ``shape``)
    on ``image``, and zeroing ``zero`` (its attention's output projection) moves them
    (:func:`assert_matters`). Returns the original's logits."""
    with torch.no_grad():
        want = original(image, mode="tensor")
        got = fast(image, mode="tensor")
    assert got.shape == shape
    assert_close(got, want.double(), torch.float32, "logits")
    assert_matters(zero, lambda: fast(image, mode="tensor"), want)
    return want


def original_and_plugin_models(original_cfg, fast_cfg, tmp_path, randomize: Callable[[nn.Module], None]):
    """The segmentors of both configs (:func:`plugin_configs`): the original with seeded random
    weights (``randomize``), the plugin model loading the original's checkpoint strictly. Both
    in eval mode."""
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint
    from mmseg.registry import MODELS

    init_default_scope(fast_cfg.get("default_scope", "mmseg"))  # as mmseg.apis.init_model does
    torch.manual_seed(0)
    original = MODELS.build(original_cfg.model)
    randomize(original)
    checkpoint = tmp_path / "original.pth"
    torch.save({"meta": {}, "state_dict": original.state_dict()}, checkpoint)
    fast = MODELS.build(fast_cfg.model)
    load_checkpoint(fast, str(checkpoint), map_location="cpu", strict=True)
    return original.eval(), fast.eval()
