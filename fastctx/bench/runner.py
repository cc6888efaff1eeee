"""The benchmark-and-parity report: every candidate of every case, side by side in one run.

For each case and dtype: a float64 ground truth (python_ref on upcast inputs, output and input
gradients for one random upstream gradient); each candidate is first checked against it (a
candidate that fails parity is reported as failed and not timed), then the candidates are timed
side by side (in turns on CPU), forward (no grad), backward (``torch.autograd.grad`` on a retained
graph) and forward+backward, and each one's peak memory for forward and for forward+backward.
Ratios are against the reference and the strongest plain-PyTorch formulation of the same run. A
case's ``timing_only`` candidates (e.g. a bandwidth floor that only reads the inputs) are timed
without the parity check. A candidate that raises
:class:`fastctx.bench.measure.Skip` (too large for this machine) is recorded as ``skipped: ...``,
and so is every candidate of a case whose ``make_inputs`` raises it.
A case whose ``check_grads`` attribute is False (a ``Case`` subclass: whole models, where float32
rounding of parameter gradients through a deep network exceeds the per-op tolerance) has its
output checked against the truth and its gradients only computed; one with a ``yardstick``
candidate also accepts an output at most twice as far from the truth as the yardstick's.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Callable, Iterable

import torch

import fastctx
from fastctx.bench.cases import CASES, FULL_ONLY, Case
from fastctx.bench.measure import Skip, peak_mib, time_ms_side_by_side
from fastctx.testing import mismatch

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def metadata(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # FASTCTX_COMMIT first: a lent GPU's copy of the tree may have no .git, or (session 11) a
    # .git of another commit than the files it runs
    commit = os.environ.get("FASTCTX_COMMIT")
    try:
        commit = commit or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "fastctx": fastctx.__version__,
        "commit": commit,
        "python": platform.python_version(),
        "nan_checks": "off (FASTCTX_CHECK_NAN=0) for every candidate",
        "tf32": "off in cuDNN and cuBLAS for every candidate (float32 is float32)",
        "peak_memory": "bytes held by torch's allocator at once during one call, above those held before it"
                       + (" (torch.cuda.max_memory_allocated)" if device.type == "cuda" else " (the profiler's memory events)"),
    }


def _fwd_bwd(fn: Callable, inputs: tuple, dout: torch.Tensor):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, dout)
    return out, grads


def _truth(case: Case, inputs: tuple, dtype: torch.dtype):
    """float64 output and gradients, and the upstream gradient (drawn in ``dtype``) they used."""
    x64 = tuple(t.detach().double().requires_grad_(True) for t in inputs)
    out = case.truth(*x64)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(out.device, dtype)
    return out.detach(), torch.autograd.grad(out, x64, dout.double()), dout


def _row(case: Case, dtype: torch.dtype, device: torch.device, cand: str, mode: str, **kw) -> dict:
    return {
        "op": case.op, "case": case.name, "config": case.config, "device_type": device.type,
        "dtype": DTYPE_NAMES[dtype], "candidate": cand, "mode": mode,
        "median_ms": None, "p20_ms": None, "p80_ms": None, "peak_mib": None, "out_rel_err": None, "status": "ok", **kw,
    }


def min_reps(quick: bool, reps: int | None = None) -> int:
    """Timed calls per candidate and mode, at least (on CPU; CUDA times with triton's do_bench)."""
    return reps if reps is not None else 3 if quick else 5


def run_case(case: Case, dtype: torch.dtype, device: torch.device, quick: bool, log: Callable[[str], None],
             reps: int | None = None) -> list[dict]:
    min_time = 0.2 if quick else 1.0
    n_reps = min_reps(quick, reps)
    try:
        base = case.make_inputs(dtype, device)
    except Skip as e:  # no inputs for this case here (e.g. bench/heads.py: nothing swapped)
        log(f"  skipped: {e}")
        return [_row(case, dtype, device, cand, "-", status=f"skipped: {e}") for cand in case.candidates]
    inputs = tuple(t.detach().requires_grad_(True) for t in base)
    truth_out, truth_grads, dout = _truth(case, inputs, dtype)
    rows, timed = [], {}  # timed: the candidates that passed parity -> (fn, out_rel_err, timing_only)
    # a yardstick candidate (ModelCase) runs first: its largest distance to the truth judges the
    # others, and its (out, grads) serve its own turn below
    yard, yard_run, yard_diff = getattr(case, "yardstick", None), None, None
    if yard is not None:
        try:
            yard_run = _fwd_bwd(case.candidates[yard], inputs, dout)
            yard_diff = _max_diff(yard_run[0], truth_out)
        except Exception:  # run again, and reported, in its turn
            yard_run = None
    for cand, fn in case.candidates.items():
        if cand in case.backends:
            why = fastctx.explain(case.op, inputs[0])[cand]
            if why != "ok":
                rows.append(_row(case, dtype, device, cand, "-", status=f"unavailable: {why}"))
                continue
        try:
            if cand == yard and yard_run is not None:
                (out, grads), yard_run = yard_run, None
            else:
                out, grads = _fwd_bwd(fn, inputs, dout)
        except Skip as e:  # too large for this machine: said so, not run
            rows.append(_row(case, dtype, device, cand, "-", status=f"skipped: {e}"))
            log(f"  {cand:10s} skipped: {e}")
            continue
        except Exception as e:  # a crash is reported, not hidden
            rows.append(_row(case, dtype, device, cand, "-", status=f"error: {type(e).__name__}: {e}"))
            continue
        timing_only = cand in case.timing_only  # e.g. a bandwidth floor: timed, not checked
        problems = []
        if not timing_only:
            problems = [mismatch(out, truth_out, dtype, "out", case.tol_scale)]
            if getattr(case, "check_grads", True):  # a Case subclass may check the output only
                problems += [mismatch(g, t, dtype, f"grad{i}", case.tol_scale) for i, (g, t) in enumerate(zip(grads, truth_grads))]
        problems = [p for p in problems if p]
        if problems and yard_diff is not None and len(problems) == 1 and problems[0].startswith("out:"):
            diff = _max_diff(out, truth_out)
            if diff <= 2 * yard_diff:
                log(f"  {cand:10s} out {diff:.3g} from the truth: over the float32 tolerance, within 2x "
                    f"the {yard} candidate's {yard_diff:.3g} (accepted)")
                problems = []
        # the output's distance to the truth, relative to the truth's largest element (reported)
        err = None if timing_only else _rel_err(out, truth_out)
        del out, grads
        if problems:
            rows.append(_row(case, dtype, device, cand, "-", out_rel_err=err, status="FAILED parity: " + problems[0].splitlines()[0]))
            log(f"  {cand:10s} FAILED parity: {problems[0].splitlines()[0]}")
            continue
        timed[cand] = (fn, err, timing_only)

    # Every mode times the candidates side by side (in turns on CPU: measure.time_ms_side_by_side).
    def fwd(fn):
        def call():
            with torch.no_grad():
                return fn(*inputs)
        return call

    def full(fn):
        return lambda: _fwd_bwd(fn, inputs, dout)

    def bwd(out):
        return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)

    timings = {cand: {} for cand in timed}
    for mode, make in (("fwd", fwd), ("bwd", lambda fn: bwd(fn(*inputs))), ("fwd+bwd", full)):
        calls = {cand: make(fn) for cand, (fn, _, _) in timed.items()}  # bwd: each holds its graph
        for cand, t in time_ms_side_by_side(calls, device, min_time, n_reps).items():
            timings[cand][mode] = t
        del calls
    for cand, (fn, err, timing_only) in timed.items():
        peaks = {"fwd": peak_mib(fwd(fn), device), "bwd": None, "fwd+bwd": peak_mib(full(fn), device)}
        for mode in MODES:
            med, p20, p80 = timings[cand][mode]
            rows.append(_row(case, dtype, device, cand, mode, median_ms=med, p20_ms=p20, p80_ms=p80, peak_mib=peaks[mode], out_rel_err=err,
                             status="ok (timing only, no parity check)" if timing_only else "ok"))
        t = timings[cand]
        log(
            f"  {cand:10s} fwd {t['fwd'][0]:9.3f} ms  bwd {t['bwd'][0]:9.3f} ms  "
            f"fwd+bwd {t['fwd+bwd'][0]:9.3f} ms  peak {peaks['fwd+bwd'] if peaks['fwd+bwd'] is None else round(peaks['fwd+bwd'], 1)} MiB"
        )
    order = list(case.candidates)
    rows.sort(key=lambda r: order.index(r["candidate"]))  # the case's order (stable: modes stay in order)
    _ratios(rows, case)
    return rows


def _max_diff(out: torch.Tensor, truth: torch.Tensor) -> float:
    return float((out.detach().double() - truth.detach().double()).abs().max())


def _rel_err(out: torch.Tensor, truth: torch.Tensor) -> float:
    return _max_diff(out, truth) / max(float(truth.abs().max()), 1e-300)


def _ratios(rows: list[dict], case: Case) -> None:
    by = {(r["candidate"], r["mode"]): r for r in rows if r["median_ms"] is not None}
    for r in rows:
        if r["median_ms"] is None:
            continue
        for key, base in (("speedup_vs_reference", case.reference), ("speedup_vs_strongest", case.strongest)):
            b = by.get((base, r["mode"]))
            r[key] = b["median_ms"] / r["median_ms"] if b else None
        b = by.get((case.reference, r["mode"]))
        r["memory_vs_reference"] = (
            r["peak_mib"] / b["peak_mib"] if b and r["peak_mib"] is not None and b["peak_mib"] else None
        )


def _ratio(ratio: float, factor: float) -> str:
    """``ratio`` to two decimals, or to as many more as it takes not to print a ratio on the
    wrong side of ``factor`` as ``factor`` itself (0.9973 against 1 is "0.997", not "1.00")."""
    for digits in range(2, 7):
        text = f"{ratio:.{digits}f}"
        if ratio == factor or float(text) != factor:
            return text
    return text


def check_targets(cases: Iterable[Case], rows: list[dict], device: torch.device) -> list[dict]:
    """Each target of each case: "pass", "miss" or "not measured" with the figure."""
    results = []
    for case in cases:
        for t in case.targets:
            if t.device != device.type:
                continue
            for dtype in t.dtypes:
                dn = DTYPE_NAMES[dtype]
                pick = lambda cand: next(  # noqa: E731
                    (r for r in rows if r["case"] == case.name and r["op"] == case.op and r["dtype"] == dn and r["candidate"] == cand and r["mode"] == t.mode),
                    None,
                )
                mine, base = pick(t.backend), pick(t.baseline)
                entry = {"target": t.text, "case": case.name, "dtype": dn}
                if mine is None or base is None:
                    failed = next(
                        (f"{r['candidate']}: {r['status']}" if r["candidate"] != t.backend else r["status"]
                         for cand in (t.backend, t.baseline) for r in rows
                         if r["case"] == case.name and r["dtype"] == dn and r["candidate"] == cand and r["status"] != "ok"),
                        "not run",
                    )  # the candidate's own failure first, else the baseline's (e.g. skipped)
                    entry.update(result="not measured", detail=failed)
                elif t.kind == "speed":
                    ratio = base["median_ms"] / mine["median_ms"]
                    entry.update(result="pass" if ratio >= t.factor else "miss", detail=f"{_ratio(ratio, t.factor)}x (needs >= {t.factor:g}x)")
                else:
                    if mine["peak_mib"] is None or not base["peak_mib"]:
                        entry.update(result="not measured", detail="peak memory not measurable here")
                    else:
                        ratio = mine["peak_mib"] / base["peak_mib"]
                        ok = ratio < t.factor if t.strict else ratio <= t.factor
                        need = f"< {t.factor:g}x" if t.strict else f"<= {t.factor:g}x"
                        entry.update(result="pass" if ok else "miss", detail=f"{_ratio(ratio, t.factor)}x of the {t.baseline}'s peak (needs {need})")
                results.append(entry)
    return results


def run(
    ops: Iterable[str] | None = None,
    device: str | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    quick: bool = False,
    log: Callable[[str], None] = print,
    cases: Iterable[Case] | None = None,
    progress: Callable[[dict], None] | None = None,
    reps: int | None = None,
) -> dict:
    """Run the report; returns ``{"meta": ..., "rows": [...], "targets": [...]}``. ``cases``, when
    given, are run instead of the registered ones (``ops`` is then ignored): cases built outside
    :data:`CASES`, e.g. bench/heads.py's toolbox heads. ``progress``, when given, is called with
    the report so far after each case and dtype (``meta["cases_run"]`` of ``meta["cases_total"]``;
    targets of the cases not run yet say "not run"), so a run cut short (a time limit on a lent
    GPU) still leaves a report of what it measured. ``reps``: on CPU, time each candidate and
    mode at least this many calls (default 5, ``quick`` 3): more for calls of seconds on a noisy
    machine."""
    if reps is not None and reps < 1:
        raise ValueError(f"fastctx bench: reps must be at least 1, got {reps}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtypes is None:
        dtypes = (torch.float32, torch.float16) if dev.type == "cuda" else (torch.float32,)
    if cases is None:
        if ops:
            ops = list(ops)
        else:
            ops = [op for op in CASES if not (quick and op in FULL_ONLY)]
            if quick:
                log(f"--quick leaves out {', '.join(FULL_ONLY)} (run without --quick, or name them in --ops)")
        unknown = [o for o in ops if o not in CASES]
        if unknown:
            raise ValueError(f"fastctx bench: unknown op(s) {unknown}; choose from {list(CASES)}")
        cases = [case for op in ops for case in CASES[op](quick)]
    here = lambda c: dev.type in getattr(c, "devices", (dev.type,))  # noqa: E731
    cases = list(cases)
    elsewhere = [f"{c.op} {c.name}" for c in cases if not here(c)]
    if elsewhere:
        log(f"left out on {dev.type} (cases for other devices): {', '.join(elsewhere)}")
    cases = [c for c in cases if here(c)]
    # the baselines do not check for NaN either: time the kernels (restored afterwards: run() is
    # also called in-process, e.g. by bench/heads.py and the tests)
    saved = os.environ.get("FASTCTX_CHECK_NAN")
    os.environ["FASTCTX_CHECK_NAN"] = "0"
    # float32 means float32 for every candidate: no TF32 in cuDNN's convolutions (on by default)
    # or cuBLAS's products (the fused kernels' float32 dots are tf32x3, float32's accuracy)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _run(cases, dev, dtypes, quick, log, progress, reps)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        if saved is None:
            del os.environ["FASTCTX_CHECK_NAN"]
        else:
            os.environ["FASTCTX_CHECK_NAN"] = saved


def _run(cases, dev: torch.device, dtypes, quick: bool, log: Callable[[str], None],
         progress: Callable[[dict], None] | None, reps: int | None) -> dict:
    meta = metadata(dev)
    if dev.type == "cpu":
        meta["timed_calls"] = f"at least {min_reps(quick, reps)} a candidate and mode, in turns"
    log(f"fastctx bench on {meta['device']} (torch {meta['torch']}, triton {meta['triton']})")
    rows, all_cases, dtypes = [], list(cases), list(dtypes)
    meta.update(cases_total=len(all_cases) * len(dtypes), cases_run=0)
    for case in all_cases:
        for dtype in dtypes:
            log(f"{case.op} {case.name} {DTYPE_NAMES[dtype]}")
            rows += run_case(case, dtype, dev, quick, log, reps)
            meta["cases_run"] += 1
            if progress is not None:
                progress({"meta": dict(meta), "rows": list(rows), "targets": check_targets(all_cases, rows, dev)})
    return {"meta": meta, "rows": rows, "targets": check_targets(all_cases, rows, dev)}
