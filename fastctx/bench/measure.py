"""Timing and peak memory, on CPU and CUDA.

* CUDA times: ``triton.testing.do_bench`` (CUDA events, warm-up, median and the 20th/80th
  percentiles); without triton, CUDA events in a loop.
* CPU times: ``time.perf_counter`` around single calls after a warm-up call, repeated until
  ``min_time`` seconds have passed (at least ``min_reps`` calls); median and percentiles. The
  report times a case's candidates in turns (:func:`time_ms_side_by_side`).
* CUDA peak memory: ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
* CPU peak memory: the most bytes torch's CPU allocator held at once during the call, above what
  it held before it, from the profiler's memory events (what ``torch.cuda.max_memory_allocated``
  gives on CUDA): every tensor, and the per-thread scratch of fastctx's CPU kernels (allocated
  through torch for this, csrc/cpu/common.h), counted to the byte; buffers that BLAS or oneDNN
  allocate for themselves are not. One call after a warm-up: the figure does not depend on the
  machine's state. (The process's peak resident set, measured before, moved by a fifth between
  calls of the same head, with what the allocator kept resident from earlier calls.)
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, min_time: float = 1.0, min_reps: int = 5) -> tuple[float, float, float]:
    """(median, 20th percentile, 80th percentile) of one call of ``fn``, in milliseconds."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            med, p20, p80 = do_bench(fn, warmup=25, rep=max(100, int(min_time * 1000)), quantiles=[0.5, 0.2, 0.8])
            return float(med), float(p20), float(p80)
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(max(min_reps, 20)):
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        fn()  # warm-up
        samples = []
        t_end = time.perf_counter() + min_time
        while len(samples) < min_reps or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return _summary(samples)


def _summary(samples: list[float]) -> tuple[float, float, float]:
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return statistics.median(samples), q[1], q[7]


#: at most this many calls of one candidate per round of :func:`time_ms_side_by_side`
MAX_CALLS_PER_ROUND = 20


def time_ms_side_by_side(fns: dict[str, Callable[[], object]], device: torch.device, min_time: float = 1.0,
                         min_reps: int = 5) -> dict[str, tuple[float, float, float]]:
    """(median, 20th, 80th percentile) of one call of each of ``fns``, in milliseconds.

    On CPU the candidates take turns: rounds in which each runs for about as long as the slowest
    one's single call (1 to ``MAX_CALLS_PER_ROUND`` calls, from the warm-up times), until every
    candidate has ``min_reps`` calls and the rounds have taken ``min_time`` per candidate. A slow
    drift of the machine (memory state, other load) then moves every candidate alike; timed one
    after the other, a 14-minute run of two toolbox heads put a ~5% drift into their ratio
    (bench/results/cpu-epyc-2threads-session4/README.md). On CUDA: :func:`time_ms` per candidate.
    """
    if device.type == "cuda" or len(fns) < 2:
        return {k: time_ms(f, device, min_time, min_reps) for k, f in fns.items()}
    once = {}
    for k, f in fns.items():  # warm-up, and how long one call takes
        t0 = time.perf_counter()
        f()
        once[k] = max(time.perf_counter() - t0, 1e-6)
    slowest = max(once.values())
    calls = {k: max(1, min(MAX_CALLS_PER_ROUND, round(slowest / t))) for k, t in once.items()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    t_end = time.perf_counter() + min_time * len(fns)
    while min(len(v) for v in samples.values()) < min_reps or time.perf_counter() < t_end:
        for k, f in fns.items():
            for _ in range(calls[k]):
                t0 = time.perf_counter()
                f()
                samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: _summary(v) for k, v in samples.items()}


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 on /dev/null: the profiler's C++ side logs two lines to it at each start
    and stop (and, with a CUDA build of torch on a machine without a GPU, an 'ERROR' that its
    device query failed), which would bury a report's log. The measured call has run before
    (warm-up and timing), so nothing it would print is lost; exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_memory_events(fn: Callable[[], object]) -> list[int]:
    """What torch's CPU allocator did during ``fn()``, in time order, from the profiler's memory
    events: bytes allocated (positive) and freed (negative)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    return [nbytes for _, nbytes in events]


def _cpu_allocated_peak(fn: Callable[[], object]) -> int:
    """The most bytes torch's CPU allocator held at once during ``fn()``, above what it held before."""
    live = peak = 0
    for nbytes in cpu_memory_events(fn):
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory that one call of ``fn`` adds above what was in use before it, in MiB (after a
    warm-up call: first-call allocations, thread pools and caches, are not the op's memory)."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    fn()
    gc.collect()
    return _cpu_allocated_peak(fn) / 2**20


class Skip(Exception):
    """Raised by a candidate, before it allocates anything, that would not fit this machine (e.g.
    a dense ``N x N`` attention at inference size); the runner records ``skipped: <message>``
    instead of running it."""


def memory_cap_bytes(device: torch.device) -> int:
    """What one candidate may take: half the memory available now (``MemAvailable`` on CPU, the
    free memory of the card on CUDA), or ``FASTCTX_BENCH_MEM_CAP_GIB`` when set."""
    env = os.environ.get("FASTCTX_BENCH_MEM_CAP_GIB")
    if env:
        return int(float(env) * 2**30)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        return _meminfo("MemAvailable:") // 2
    except (OSError, KeyError):
        return 4 * 2**30


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)
