"""Where a candidate's time goes on a GPU: device time (the profiler's kernel times) against wall
time per forward+backward call, and the kernels that take it, for the first quick case of each
operator. The report times whole calls; at the models' sizes the host side (autograd, custom-op
dispatch, launches) may set that time rather than the kernels (bench/results/h200-session9).

Usage: python bench/gpu_profile.py [--ops a,b] [--dtype fp16] [--candidates reference,triton]
       [--calls 20] [--host N] [--nan-check] [--out FILE.json]
--host N adds the host side: the Python functions that take the most time over N more calls
(cProfile, by own time), to tell the dispatch, autograd and launch costs apart.
The inputs' NaN check is off as in the report (FASTCTX_CHECK_NAN=0; on a GPU it synchronizes)
unless --nan-check. On a machine without CUDA it profiles CPU tensors (rows are then CPU ops).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fastctx.bench.cases import CASES, FULL_ONLY
from fastctx.bench.runner import _fwd_bwd
from fastctx.cli import DTYPES

def profile_case(case, cand: str, dtype: torch.dtype, device: torch.device, calls: int, host_calls: int = 0) -> dict:
    inputs = tuple(t.detach().requires_grad_(True) for t in case.make_inputs(dtype, device))
    fn = case.candidates[cand]
    dout = torch.randn_like(fn(*inputs))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: compilation, autotuning caches, allocator
        _fwd_bwd(fn, inputs, dout)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        _fwd_bwd(fn, inputs, dout)
    sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / calls
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            _fwd_bwd(fn, inputs, dout)
        sync()
    kernels = {}
    for e in prof.key_averages():
        t = e.device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if t > 0 and (device.type != "cuda" or e.device_type.name == "CUDA"):
            kernels[e.key] = (t / 1e3 / calls, e.count / calls)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    device_ms = sum(ms for _, (ms, _) in top) if device.type == "cuda" else None
    host = []
    if host_calls:
        prof_host = cProfile.Profile()
        prof_host.enable()
        for _ in range(host_calls):
            _fwd_bwd(fn, inputs, dout)
        prof_host.disable()
        sync()
        stats = pstats.Stats(prof_host).stats
        rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:12]  # by own time
        host = [{"function": f"{os.path.basename(f)}:{line}({name})"[:110], "own_us_per_call": tt / host_calls * 1e6,
                 "cum_us_per_call": ct / host_calls * 1e6} for (f, line, name), (_, _, tt, ct, _) in rows]
    return {"op": case.op, "case": case.name, "candidate": cand, "dtype": str(dtype).removeprefix("torch."),
            "wall_ms_per_call": wall_ms, "device_ms_per_call": device_ms,
            "kernels": [{"name": k[:120], "ms_per_call": ms, "launches_per_call": n} for k, (ms, n) in top[:8]],
            "host": host}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default=None)
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--candidates", default="reference,triton,cuda")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--host", type=int, default=0, help="cProfile the host side over this many calls")
    ap.add_argument("--nan-check", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ["FASTCTX_CHECK_NAN"] = "1" if args.nan_check else "0"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops = args.ops.split(",") if args.ops else [op for op in CASES if op not in FULL_ONLY]
    results = []
    for op in ops:
        case = CASES[op](True)[0]
        for cand in args.candidates.split(","):
            if cand not in case.candidates:
                continue
            try:
                r = profile_case(case, cand, DTYPES[args.dtype], device, args.calls, args.host)
            except Exception as e:  # a backend that declines (e.g. cuda for most ops) is reported
                print(f"{op} {case.name} {cand}: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
                continue
            results.append(r)
            dev = "-" if r["device_ms_per_call"] is None else f"{r['device_ms_per_call']:.3f}"
            print(f"{op} {case.name} {args.dtype} {cand}: wall {r['wall_ms_per_call']:.3f} ms, device {dev} ms per fwd+bwd")
            for k in r["kernels"][:5]:
                print(f"    {k['ms_per_call']:8.3f} ms  x{k['launches_per_call']:.0f}  {k['name'][:90]}")
            for h in r["host"]:
                print(f"    host {h['own_us_per_call']:8.1f} us own {h['cum_us_per_call']:8.1f} us cum  {h['function']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
