"""The module and model benchmark cases (fastctx/bench/cases_isnet.py, cases_models.py) at small
sizes: they are registered, their candidates agree with each other and with the float64 truth,
and the runner records a dense candidate that would not fit as skipped instead of running it."""

from __future__ import annotations

import os

import pytest
import torch

import fastctx
import fastctx.bench.cases_isnet as ci
import fastctx.bench.cases_models as cm
from fastctx.bench.cases import CASES, Case, Target
from fastctx.bench.measure import Skip
from fastctx.bench.runner import check_targets, run_case
from fastctx.testing import mismatch

CPU = torch.device("cpu")
SMALL = dict(sizes=((9, 13),), feats=24, transform=8)


def test_registered():
    assert CASES["isnet_semantic_attention"] is ci.isnet_attention_cases
    assert CASES["isnet_semantic_context"] is ci.isnet_module_cases
    assert CASES["models"] is cm.model_cases
    # the real sizes: 64x128 always, 1024x2048 inference (128x256 at 1/8) outside --quick
    for fn in (ci.isnet_attention_cases, ci.isnet_module_cases):
        assert [(c.config["H"], c.config["W"]) for c in fn(True)] == [(64, 128)]
        assert [c.config["N"] for c in fn(False)] == [8192, 32768]
    # the attention's parity covers the gradients; the whole module's the output (ReLU kinks)
    assert getattr(ci.isnet_attention_cases(True)[0], "check_grads", True) is True
    assert ci.isnet_module_cases(True)[0].check_grads is False
    targets = ci.isnet_attention_cases(True)[0].targets
    assert {(t.mode, t.kind, t.factor) for t in targets} == {
        (m, k, f) for m in ("fwd", "fwd+bwd") for k, f in (("speed", 20.0), ("memory", 0.05))
    }
    assert [c.config["model"] for c in cm.model_cases(True, size=(1, 3, 32, 32))] == list(cm.MODELS)


def _grads(fn, inputs):
    x = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    out = fn(*x)
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return out.detach(), torch.autograd.grad(out, x, dout)


@pytest.mark.parametrize("cases", [ci.isnet_attention_cases, ci.isnet_module_cases], ids=["attention", "module"])
def test_isnet_reduced_matches_dense(cases):
    """float64: the reduced and the dense candidate give the same output and input gradients
    (x, preds, and the query or feats_il), and the truth is the reduced one."""
    (case,) = cases(True, **SMALL)
    inputs = case.make_inputs(torch.float64, CPU)
    assert inputs[0].shape == (2, 24, 9, 13) and inputs[1].shape == (2, ci.K, 9, 13)
    ro, rg = _grads(case.candidates["reduced"], inputs)
    do, dg = _grads(case.candidates["dense"], inputs)
    to, _ = _grads(case.truth, inputs)
    assert ro.abs().max() > 0 and torch.equal(ro, to)
    assert mismatch(ro, do, torch.float64, "out") is None
    for i, (a, b) in enumerate(zip(rg, dg)):
        assert a.abs().max() > 0, i
        assert mismatch(a, b, torch.float64, f"grad{i}") is None


def test_dense_guard_estimate(monkeypatch):
    """32768 pixels (1024x2048 at 1/8), B=2, float32: 4 matrices of 2 x 32768^2 floats = 32 GiB;
    two N x N matmuls of 2 x 32768^2 x 256 multiply-adds, times 3 with the backward: 6.6 TFLOP."""
    monkeypatch.setenv("FASTCTX_BENCH_MEM_CAP_GIB", "1")
    with pytest.raises(Skip, match=r"dense would need 32\.0 GiB .* \(cap 1\.0 GiB\) and would do 6\.6 TFLOP"):
        ci.dense_guard(2, 32768, torch.float32, CPU, 256)
    ci.dense_guard(2, 117, torch.float32, CPU, 8)  # small: runs
    # the module's dense candidate checks before it computes anything (inputs at 1024x2048 / 8)
    (_, big) = ci.isnet_module_cases(False, sizes=((64, 128), (128, 256)), feats=8, transform=4)
    x = torch.zeros(2, 8, 128, 256)
    with pytest.raises(Skip, match="dense would need 32.0 GiB"):
        big.candidates["dense"](x, torch.zeros(2, ci.K, 128, 256), x)


def test_runner_records_skipped_dense(monkeypatch):
    """A cap below the dense candidate's need: the runner reports it skipped (with the estimate),
    still times the reduced one, and the targets against dense say "not measured"."""
    monkeypatch.setenv("FASTCTX_BENCH_MEM_CAP_GIB", "1e-6")
    (case,) = ci.isnet_attention_cases(True, **SMALL)
    case.targets = [ci.Target("reduced 20x faster", "reduced", "dense", "fwd+bwd", "speed", 20.0, "cpu", (torch.float32,))]
    rows = run_case(case, torch.float32, CPU, quick=True, log=lambda s: None)
    dense = [r for r in rows if r["candidate"] == "dense"]
    assert len(dense) == 1 and dense[0]["status"].startswith("skipped: dense would need ")
    assert "GiB" in dense[0]["status"] and dense[0]["median_ms"] is None
    reduced = {r["mode"]: r for r in rows if r["candidate"] == "reduced"}
    assert set(reduced) == {"fwd", "bwd", "fwd+bwd"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in reduced.values())
    (t,) = check_targets([case], rows, CPU)
    assert t["result"] == "not measured" and t["detail"].startswith("dense: skipped: dense would need")


def test_models_fused_matches_reference():
    """One small model case: both candidates take the image and every parameter, return the
    training outputs' logits, agree with the float64 truth in float32, and the backward reaches
    every parameter; only the logits are parity-checked (check_grads False)."""
    (case,) = cm.model_cases(True, models=("ccnet_r18_d8",), size=(1, 3, 24, 40))
    assert case.check_grads is False and case.backends == ()
    inputs = case.make_inputs(torch.float32, CPU)
    names = [n for n, _ in cm.model_for("ccnet_r18_d8", None, torch.float32, CPU).named_parameters()]
    assert len(inputs) == 1 + len(names)
    x64 = tuple(t.double() for t in inputs)
    truth, _ = _grads(case.truth, x64)
    # out (3 x 5 logits at 1/8) and aux, each [1, 19, 3, 5], flattened
    assert truth.shape == (2 * 19 * 3 * 5,)
    for cand in ("fused", "reference"):
        out, grads = _grads(case.candidates[cand], inputs)
        assert mismatch(out, truth, torch.float32, cand) is None
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert all(g.abs().max() > 0 for g in grads), cand  # every parameter reaches the logits


def test_full_size_models_are_cuda_cases_with_a_triton_candidate():
    """models_full: the mmseg-size training step, GPU only; its candidates run the same step
    (checked here at a small size on CPU, the Triton one under the interpreter when available)."""
    cases = cm.full_model_cases(True)
    assert [c.config["model"] for c in cases] == list(cm.FULL_MODELS)
    assert all(c.devices == ("cuda",) and set(c.candidates) == {"fused", "triton", "reference"}
               and (c.config["H"], c.config["W"], c.config["B"]) == (512, 1024, 2) for c in cases)
    (case,) = cm.full_model_cases(True, models=("ccnet_r18_d8",), size=(1, 3, 24, 40))
    inputs = case.make_inputs(torch.float32, CPU)
    truth, _ = _grads(case.truth, tuple(t.double() for t in inputs))
    out, _ = _grads(case.candidates["fused"], inputs)
    assert mismatch(out, truth, torch.float32, "fused") is None


def test_quick_leaves_out_the_whole_modules_unless_named(monkeypatch):
    import fastctx.bench.runner as R

    called = []
    monkeypatch.setattr(R, "CASES", {op: (lambda quick, op=op: called.append(op) or []) for op in R.CASES})
    R.run(quick=True, device="cpu", log=lambda s: None)
    assert called == [op for op in R.CASES if op not in R.FULL_ONLY] and set(R.FULL_ONLY) <= set(R.CASES)
    called.clear()
    R.run(quick=False, device="cpu", log=lambda s: None)
    assert called == list(R.CASES)
    called.clear()
    R.run(ops=["models"], quick=True, device="cpu", log=lambda s: None)
    assert called == ["models"]


def test_run_leaves_the_nan_check_as_it_was(monkeypatch):
    import fastctx.bench.runner as R

    monkeypatch.setattr(R, "CASES", {"none": lambda quick: []})
    monkeypatch.delenv("FASTCTX_CHECK_NAN", raising=False)
    R.run(device="cpu", log=lambda s: None)
    assert "FASTCTX_CHECK_NAN" not in os.environ
    monkeypatch.setenv("FASTCTX_CHECK_NAN", "1")
    R.run(device="cpu", log=lambda s: None)
    assert os.environ["FASTCTX_CHECK_NAN"] == "1"


def test_cpu_peak_counts_what_a_call_allocates():
    """The CPU peak is the most memory a call holds at once above what was held before it: what
    was allocated before the call is not counted, what the call frees before allocating more is
    not counted twice."""
    from fastctx.bench.measure import peak_mib

    cpu = torch.device("cpu")
    kept = torch.ones(16 * 2**20 // 4)  # held before the call: not counted
    calls = []

    def churn():  # 8 MiB, freed, then 4 + 12 MiB held together: 16 MiB at most
        calls.append(1)
        a = torch.ones(2 * 2**20)
        del a
        b = torch.ones(2**20)
        c = torch.ones(3 * 2**20)
        return b, c

    assert peak_mib(lambda: torch.ones(48 * 2**20 // 4), cpu) == 48.0
    assert peak_mib(churn, cpu) == 16.0
    assert len(calls) == 2  # a warm-up and the measured call
    assert peak_mib(lambda: kept.sum(), cpu) < 0.01  # reads only what was there


def test_cpu_peak_prints_nothing_and_keeps_stderr(capfd):
    """The profiler behind the CPU peak logs to file descriptor 2 at each start and stop: silenced
    for the measured call, and stderr works again afterwards, also when the call raises."""
    import sys

    from fastctx.bench.measure import peak_mib

    cpu = torch.device("cpu")
    peak_mib(lambda: torch.ones(1024), cpu)
    calls = []

    def second_call_fails():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the measured call failed")

    with pytest.raises(RuntimeError, match="the measured call failed"):
        peak_mib(second_call_fails, cpu)
    assert capfd.readouterr().err == ""
    print("still here", file=sys.stderr)
    assert capfd.readouterr().err == "still here\n"


def test_cpu_peak_counts_every_threads_scratch():
    """The CPU kernels' per-thread scratch is allocated where the CPU peak sees it: with two
    threads the same call holds one more thread's scratch (a criss-cross forward over two tiles of
    16 columns: one slot of 16 * H * (2 * Cqk + 2 * Cv) floats, the packed tile)."""
    from fastctx.bench.measure import peak_mib

    cpu = torch.device("cpu")
    q, v = torch.randn(1, 8, 16, 24), torch.randn(1, 8, 16, 24)

    def call():
        with torch.no_grad():
            return fastctx.criss_cross_attention(q, q, v, backend="cpu")

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = peak_mib(call, cpu)
        torch.set_num_threads(2)
        two = peak_mib(call, cpu)
    finally:
        torch.set_num_threads(threads)
    slot = 16 * 16 * (2 * 8 + 2 * 8) * 4
    assert (two - one) * 2**20 == slot, (one, two)


def test_cpu_candidates_are_timed_in_turns():
    """On CPU the report's candidates take turns (a drift of the machine hits all alike): every
    candidate's calls are spread over the whole timing, each gets at least min_reps samples, and a
    fast candidate gets several calls per turn of a slow one."""
    import time

    from fastctx.bench.measure import MAX_CALLS_PER_ROUND, time_ms_side_by_side

    order = []

    def candidate(name, seconds):
        def call():
            order.append(name)
            time.sleep(seconds)
        return call

    res = time_ms_side_by_side({"slow": candidate("slow", 0.02), "fast": candidate("fast", 0.002)},
                               torch.device("cpu"), min_time=0.05, min_reps=3)
    assert set(res) == {"slow", "fast"} and all(len(v) == 3 for v in res.values())
    slow_at = [i for i, n in enumerate(order) if n == "slow"]
    assert len(slow_at) >= 1 + 3  # the warm-up and min_reps timed calls
    runs = [b - a - 1 for a, b in zip(slow_at, slow_at[1:])]  # fast calls between two slow ones
    assert all(1 <= r <= MAX_CALLS_PER_ROUND for r in runs), runs
    assert order[-1] == "fast" and max(runs[1:]) > 1  # turns end with the fast one's share


def test_a_run_cut_short_leaves_a_partial_report(monkeypatch, tmp_path):
    """`fastctx bench` writes the report after each case: a run stopped part way (a lent GPU's time
    limit) leaves the cases it measured on disk, marked partial, the rest "not run"."""
    import json
    from types import SimpleNamespace

    import fastctx.bench.runner as R
    from fastctx import cli

    target = Target("fast", "cpu", "reference", "fwd", "speed", 1.0, "cpu", (torch.float32,))
    cases = [SimpleNamespace(op="toy", name=n, config={}, targets=[target], reference="reference",
                             strongest="reference") for n in ("first", "second")]

    def run_case(case, dtype, device, quick, log, reps=None):
        if case.name == "second":
            raise KeyboardInterrupt  # what a time limit's signal does part way through
        rows = [R._row(case, dtype, device, cand, mode, median_ms=ms, p20_ms=ms, p80_ms=ms, peak_mib=1.0)
                for cand, ms in (("reference", 2.0), ("cpu", 1.0)) for mode in ("fwd", "bwd", "fwd+bwd")]
        R._ratios(rows, case)
        return rows

    monkeypatch.setattr(R, "CASES", {"toy": lambda quick: cases})
    monkeypatch.setattr(R, "FULL_ONLY", ())
    monkeypatch.setattr(R, "run_case", run_case)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["bench", "--device", "cpu", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["meta"]["cases_run"], report["meta"]["cases_total"]) == (1, 2)
    assert {r["case"] for r in report["rows"]} == {"first"}
    assert [(t["case"], t["result"]) for t in report["targets"]] == [("first", "pass"), ("second", "not measured")]
    assert report["targets"][1]["detail"] == "not run"
    md = (tmp_path / "report.md").read_text()
    assert "Partial report: 1 of 2 cases" in md and "## toy first fp32" in md and "## toy second" not in md


@pytest.mark.parametrize("argv, want", [([], 3), (["--reps", "7"], 7)])
def test_reps_sets_the_timed_calls_of_every_candidate_and_mode(monkeypatch, tmp_path, argv, want):
    """`fastctx bench --reps N`: on CPU every candidate gets at least N timed calls in each mode
    (plus its warm-up, its parity run and its peak-memory calls), and the report says so."""
    import json

    import fastctx.bench.runner as R
    from fastctx import cli

    calls = {"a": 0, "b": 0}

    def candidate(name):
        def fn(x):
            calls[name] += 1
            return 2 * x
        return fn

    case = Case("toy", "tiny", {}, lambda dtype, device: (torch.ones(3, dtype=dtype, device=device),),
                lambda x: 2 * x, {"a": candidate("a"), "b": candidate("b")}, (), reference="a", strongest="a")
    asked = []

    def timed(fns, device, min_time, min_reps):  # the runner's timing, min_reps recorded
        asked.append(min_reps)
        return side_by_side(fns, device, min_time, min_reps)

    side_by_side = R.time_ms_side_by_side
    monkeypatch.setattr(R, "time_ms_side_by_side", timed)
    monkeypatch.setattr(R, "CASES", {"toy": lambda quick: [case]})
    assert cli.main(["bench", "--device", "cpu", "--quick", "--out", str(tmp_path), *argv]) == 0
    assert asked == [want] * 3  # fwd, bwd, fwd+bwd
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["timed_calls"] == f"at least {want} a candidate and mode, in turns"
    assert f"at least {want} a candidate and mode" in (tmp_path / "report.md").read_text()
    assert all(n >= 3 * want + 1 for n in calls.values()), calls
    with pytest.raises(ValueError, match="reps must be at least 1, got 0"):
        R.run(cases=[case], device="cpu", quick=True, reps=0, log=lambda s: None)


def test_targets_memory_below_is_strict_and_ratios_do_not_round_onto_the_bound():
    """A "below the reference's peak" target misses on a tie (peaks are exact to the byte on CPU),
    and a ratio within rounding of the bound is printed with the digits that show its side."""
    def check(mine, base, strict, kind="memory"):
        case = Case("op", "c", {}, None, None, {}, ())
        case.targets = [Target("t", "cpu", "reference", "fwd+bwd", kind, 1.0, "cpu", (torch.float32,), strict=strict)]
        rows = [{"case": "c", "op": "op", "dtype": "fp32", "candidate": cand, "mode": "fwd+bwd", "status": "ok",
                 "peak_mib": peak, "median_ms": peak} for cand, peak in (("cpu", mine), ("reference", base))]
        (t,) = check_targets([case], rows, CPU)
        return t["result"], t["detail"]

    assert check(65.159, 65.336, True) == ("pass", "0.997x of the reference's peak (needs < 1x)")
    assert check(65.336, 65.336, True) == ("miss", "1.00x of the reference's peak (needs < 1x)")
    assert check(65.336, 65.336, False) == ("pass", "1.00x of the reference's peak (needs <= 1x)")
    assert check(65.4, 65.336, True) == ("miss", "1.001x of the reference's peak (needs < 1x)")
    assert check(100.2, 100.0, False, "speed") == ("miss", "0.998x (needs >= 1x)")


def test_a_case_for_other_devices_is_left_out_and_said_so(monkeypatch):
    """Case.devices: the whole-ISA-block case runs on CUDA only (its target is a GPU's); on CPU the
    report leaves it out, says so, and runs the rest."""
    import fastctx.bench.runner as R
    from fastctx.bench.cases_interlaced import isa_block_cases

    (block,) = isa_block_cases(True)
    assert block.devices == ("cuda",) and [t.device for t in block.targets] == ["cuda"]
    ran, lines = [], []
    monkeypatch.setattr(R, "run_case", lambda case, *a, **k: ran.append(case.name) or [])
    other = Case("toy", "here", {}, None, None, {}, ())
    report = R.run(device="cpu", cases=[block, other], log=lines.append)
    assert ran == ["here"] and report["meta"]["cases_total"] == 1
    assert any("left out on cpu" in line and block.name in line for line in lines)


def test_isa_block_candidates_skip_a_backend_that_cannot_run():
    """A backend that declines the inputs (cuda on CPU tensors) is reported skipped, not an error;
    the block's weights are the same in every dtype (seeded)."""
    from fastctx.bench.cases_interlaced import _isa_block, isa_block_module

    with pytest.raises(Skip, match="cuda"):
        _isa_block(torch.randn(1, 512, 8, 8), "cuda")
    a, b = isa_block_module(torch.float32, CPU), isa_block_module(torch.float64, CPU)
    for (n, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa.double(), pb), n


def test_model_parity_yardstick():
    """A whole model's output over the float32 tolerance passes when it is at most twice as far
    from the float64 truth as the reference backend's (the yardstick), and fails beyond that."""
    import fastctx.bench.runner as R

    def scaled(f):
        return lambda x: x * (1.0 + f)

    case = cm.ModelCase(
        op="models", name="synthetic", config={},
        make_inputs=lambda dtype, device: (torch.linspace(-1, 1, 256, dtype=dtype, device=device),),
        truth=lambda x: x * 1.0,
        candidates={"near": scaled(5e-3), "far": scaled(1.5e-2), "reference": scaled(3e-3)},
        backends=(), tol_scale=1.0, devices=("cpu",),
    )
    rows = R.run_case(case, torch.float32, torch.device("cpu"), True, log=lambda s: None)
    status = {r["candidate"]: r["status"] for r in rows}
    assert status["reference"] == "ok" and status["near"] == "ok", status
    assert status["far"].startswith("FAILED parity"), status
    case.yardstick = None  # without it, all three miss the float32 tolerance
    rows = R.run_case(case, torch.float32, torch.device("cpu"), True, log=lambda s: None)
    assert all(r["status"].startswith("FAILED parity") for r in rows)
