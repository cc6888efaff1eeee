"""fastctx's own host time per call of the Triton backend, on a machine without a GPU: every
Triton launch is stubbed out (``JITFunction.run`` returns at once: no binding, no compilation, no
launch), the ops run on small CPU tensors, and what is left is the Python and torch work of a
call: validation, the custom op / autograd wrappers, configs, allocations, copies, argument
lists. On a GPU the launches' own host cost (Triton's binder and launcher) comes on top; at the
models' sizes the fused ops are host-bound (bench/results/h200-session10, h100-session11), so
this is the part of their wall time fastctx controls.

Usage: python bench/host_overhead.py [--ops criss_cross_attention,...] [--calls 300] [--prof N]
Prints microseconds per forward and per forward+backward call (median of 5 rounds); --prof N
adds the functions with the most own time over N more forward+backward calls (cProfile).
The small inputs keep the tensor work (the allocations, channels-last copies on the CPU) small
next to the fixed per-call cost; absolute figures are this machine's.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JITFunctions, to stub
os.environ["FASTCTX_CHECK_NAN"] = "0"  # as in the report
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fastctx  # noqa: E402
import fastctx.backends as _fb  # noqa: E402

JITFunction.run = lambda self, *a, grid, warmup, **kw: None  # no launch
_why_not = _fb.why_not
# the Triton backend accepts these CPU tensors as if they were CUDA ones (nothing launches)
_fb.why_not = lambda op, b, dt, dtype: _why_not(op, b, "cuda" if (b == "triton" and dt == "cpu") else dt, dtype)


def _r(*shape):
    return torch.randn(*shape, requires_grad=True)


#: op -> (inputs, call): small CPU tensors, backend "triton"
OPS = {
    "criss_cross_attention": lambda: ((_r(1, 16, 8, 8), _r(1, 16, 8, 8), _r(1, 16, 8, 8)),
                                      lambda q, k, v: fastctx.criss_cross_attention(q, k, v, backend="triton")),
    "interlaced_attention": lambda: ((_r(1, 16, 8, 8), _r(1, 16, 8, 8), _r(1, 16, 8, 8)),
                                     lambda q, k, v: fastctx.interlaced_attention(q, k, v, block=(4, 4), backend="triton")),
    "region_attention": lambda: ((_r(1, 16, 8, 8), _r(1, 16, 5), _r(1, 16, 5)),
                                 lambda q, k, v: fastctx.region_attention(q, k, v, backend="triton")),
    "spatial_gather": lambda: ((_r(1, 16, 8, 8), _r(1, 5, 8, 8)),
                               lambda f, x: fastctx.spatial_gather(f, x, backend="triton")),
    "pyramid_pool": lambda: ((_r(1, 16, 8, 8),), lambda x: fastctx.pyramid_pool(x, backend="triton")),
    "semantic_pool": lambda: ((_r(1, 16, 8, 8), _r(1, 5, 8, 8)),
                              lambda f, x: fastctx.semantic_pool(f, x, backend="triton")),
}


def _us(fn, calls: int) -> float:
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(rounds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--prof", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# host time per call, Triton launches stubbed; torch {torch.__version__}, 1 thread")
    for op in args.ops.split(","):
        inputs, call = OPS[op]()
        dout = torch.randn_like(call(*inputs))

        def fwd():
            with torch.no_grad():
                call(*inputs)

        def step():
            torch.autograd.grad(call(*inputs), inputs, dout)

        for _ in range(20):  # warm-up: caches, the dispatcher's lookups
            step()
        print(f"{op}: forward {_us(fwd, args.calls):.1f} us, forward+backward {_us(step, args.calls):.1f} us",
              flush=True)
        if args.prof:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.prof):
                step()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
