"""Where the CPU kernels stand against the reference away from the report's sizes: every op, the
"cpu" backend and the reference side by side in one run, forward (no grad) and forward+backward,
on a grid of smaller and odd sizes (B = 1 inference, 12x12-64x64 maps, 97x97 and 104x104, few and
many keys or classes). The report (``python -m fastctx bench``) times the models' sizes; this
finds the sizes where the fused kernels lose, if any.

Usage: python bench/cpu_sweep.py [--threads 2] [--ops cc,isa,ra,pa,pp,sg,sp] [--min-time 0.5]
       [--channels-last]
Prints one line per case: the median milliseconds of each candidate, timed in turns as the report
times them (:func:`fastctx.bench.measure.time_ms_side_by_side`), and their ratio (reference time /
cpu time: above 1, the kernels are faster). NaN input checks stay on, as by default (both
candidates pay them). Timings drift 10-40% over minutes on a shared machine: the ratio of the
same line is the figure to read.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fastctx  # noqa: E402
from fastctx.bench.measure import time_ms_side_by_side  # noqa: E402

CPU = torch.device("cpu")

F = fastctx
# op key -> list of (label, function, input shapes, keyword arguments)
CASES = {
    "cc": [(f"criss_cross B{B} C{C}/{Cv} {H}x{W}", F.criss_cross_attention,
            [(B, C, H, W), (B, C, H, W), (B, Cv, H, W)], {})
           for B, C, Cv, H, W in [(1, 8, 64, 16, 16), (1, 64, 512, 32, 32), (8, 64, 512, 32, 32),
                                  (2, 16, 128, 24, 24), (1, 64, 512, 64, 64), (4, 32, 256, 48, 48),
                                  (1, 64, 512, 13, 97)]],
    "isa": [(f"interlaced {mode} B{B} C{C}/{Cv} {H}x{W} block {blk[0]}x{blk[1]}",
             F.interlaced_attention, [(B, C, H, W), (B, C, H, W), (B, Cv, H, W)],
             {"block": blk, "mode": mode})
            for B, C, Cv, H, W, blk in [
                (1, 32, 64, 16, 16, (4, 4)), (1, 256, 512, 16, 16, (8, 8)),
                (1, 256, 512, 32, 32, (8, 8)), (2, 64, 128, 24, 40, (8, 8)),
                (2, 256, 512, 48, 48, (8, 8)), (1, 256, 512, 32, 32, (4, 4)),
                (2, 256, 512, 104, 104, (8, 8)), (4, 16, 16, 12, 12, (3, 3))]
            for mode in ("long", "short")],
    "ra": [(f"region_attention B{B} C{C}/{Cv} {H}x{W} S{S}", F.region_attention,
            [(B, C, H, W), (B, C, S), (B, Cv, S)], {})
           for B, C, Cv, H, W, S in [(1, 256, 512, 32, 32, 19), (8, 256, 512, 16, 16, 19),
                                     (1, 64, 64, 32, 32, 110), (2, 128, 128, 24, 24, 150),
                                     (1, 512, 512, 8, 8, 19), (4, 32, 32, 64, 64, 5)]],
    "pa": [(f"pyramid_attention B{B} C{C} {H}x{W}", F.pyramid_attention,
            [(B, C, H, W), (B, C, H, W), (B, C, H, W)], {})
           for B, C, H, W in [(1, 64, 32, 32), (2, 256, 24, 24), (8, 128, 16, 16),
                              (1, 256, 97, 97)]],
    "pp": [(f"pyramid_pool B{B} C{C} {H}x{W}", F.pyramid_pool, [(B, C, H, W)], {})
           for B, C, H, W in [(1, 64, 32, 32), (8, 256, 16, 16), (2, 512, 97, 97), (4, 16, 7, 5)]],
    "sg": [(f"spatial_gather B{B} C{C} K{K} {H}x{W}", F.spatial_gather,
            [(B, C, H, W), (B, K, H, W)], {})
           for B, C, K, H, W in [(1, 512, 19, 32, 32), (8, 512, 19, 16, 16), (2, 128, 150, 24, 24),
                                 (1, 64, 5, 64, 64), (4, 512, 171, 12, 12)]],
    "sp": [(f"semantic_pool B{B} C{C} K{K} {H}x{W}", F.semantic_pool,
            [(B, C, H, W), (B, K, H, W)], {})
           for B, C, K, H, W in [(1, 512, 19, 32, 32), (8, 512, 19, 16, 16),
                                 (2, 128, 150, 24, 24)]],
}


def run_case(label, op, shapes, kwargs, min_time: float, channels_last: bool = False) -> str:
    inputs = [torch.randn(*s) for s in shapes]
    if channels_last:  # the 4-D inputs (maps); keys and values [B, C, S] stay as they are
        inputs = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
                  for t in inputs]
    inputs = [t.requires_grad_() for t in inputs]
    cells = []
    for mode in ("fwd", "fwd+bwd"):
        calls = {}
        for backend in ("reference", "cpu"):
            if mode == "fwd":
                def call(backend=backend):
                    with torch.no_grad():
                        op(*inputs, backend=backend, **kwargs)
            else:
                def call(backend=backend):
                    out = op(*inputs, backend=backend, **kwargs)
                    torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)
            calls[backend] = call
        ms = {k: med for k, (med, _, _) in time_ms_side_by_side(calls, CPU, min_time).items()}
        cells.append(f"{mode} ref {ms['reference']:.2f} cpu {ms['cpu']:.2f} ms "
                     f"= {ms['reference'] / ms['cpu']:.2f}x")
    return f"{label:55s} | " + " | ".join(cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--ops", default=",".join(CASES),
                        help=f"comma-separated, of {','.join(CASES)}")
    parser.add_argument("--channels-last", action="store_true",
                        help="4-D inputs in channels_last memory (as under channels_last training)")
    parser.add_argument("--min-time", type=float, default=0.5,
                        help="seconds of calls per candidate and mode (default 0.5)")
    args = parser.parse_args(argv)
    ops = args.ops.split(",")
    unknown = [o for o in ops if o not in CASES]
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {','.join(CASES)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"fastctx CPU sweep: torch {torch.__version__}, {args.threads} threads, "
          f"medians of >= {args.min_time} s per candidate, in turns"
          + (", channels_last inputs" if args.channels_last else ""))
    for key in ops:
        for case in CASES[key]:
            print(run_case(*case, args.min_time, args.channels_last), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
