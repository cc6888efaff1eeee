"""``fastctx`` command line: ``fastctx bench`` (the report) and ``fastctx info`` (backends)."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _bench(args: argparse.Namespace) -> int:
    from fastctx import bench

    dtypes = [DTYPES[d] for d in args.dtypes.split(",")] if args.dtypes else None
    report = bench.run(ops=args.ops.split(",") if args.ops else None, device=args.device, dtypes=dtypes, quick=args.quick)
    paths = bench.write(report, args.out)
    print()
    print(bench.markdown(report))
    print(f"written: {', '.join(paths.values())}")
    failed = [r for r in report["rows"] if r["status"].startswith(("FAILED", "error"))]
    return 1 if failed else 0


def _info(_: argparse.Namespace) -> int:
    import fastctx
    from fastctx import _ext
    from fastctx.backends import _OPS

    ok, why = _ext.available()
    print(f"fastctx {fastctx.__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    print(f"compiled extension: {'yes' if ok else why}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        x = torch.empty(1, device=dev)
        print(f"\nbackends for {dev} float32 tensors (in order of preference, then the others):")
        for op in _OPS:
            print(f"  {op}:")
            for name, reason in fastctx.explain(op, x).items():
                print(f"    {name:10s} {reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastctx", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time every backend side by side, with parity checks; write JSON/CSV/Markdown")
    b.add_argument("--quick", action="store_true", help="fewer repetitions (a few minutes on a 2-core CPU)")
    b.add_argument("--ops", help="comma-separated ops (default: all with benchmark cases)")
    b.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    b.add_argument("--dtypes", help="comma-separated of fp64,fp32,fp16,bf16 (default: fp32 on CPU, fp32,fp16 on CUDA)")
    b.add_argument("--out", default="fastctx-report", help="output folder (default: ./fastctx-report)")
    b.set_defaults(fn=_bench)
    i = sub.add_parser("info", help="the compiled extension and why each backend runs or declines")
    i.set_defaults(fn=_info)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
