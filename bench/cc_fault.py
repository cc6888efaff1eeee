"""Which float32 criss-cross block change faults (session 10 run 3: an illegal memory access in
test_parity[triton-cuda-B1-C8x24-17x33-fp32] with the backward's dq at 64 queries and dk/dv at
64 keys, each measured faster alone at CCNet's sizes). Each variant runs in its own process
(an illegal access poisons the CUDA context), with CUDA_LAUNCH_BLOCKING=1, on that test's shape,
and is checked against the float64 reference.

Usage: python bench/cc_fault.py [--variants base,dq64,dkdv64,both] [--shape 1,8,24,17,33]
On a machine without CUDA it runs the same on CPU tensors under TRITON_INTERPRET=1 (a check of
the script, not of the GPU code).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

VARIANTS = {"base": {}, "dq64": {"dq": {"BLOCK_M": 64}}, "dkdv64": {"dkdv": {"BLOCK_N": 64}},
            "both": {"dq": {"BLOCK_M": 64}, "dkdv": {"BLOCK_N": 64}}}


def run_one(name: str, shape: tuple[int, ...]) -> None:
    import torch

    import python_ref
    from fastctx.triton import criss_cross as cc

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    B, cq, cv, H, W = shape
    torch.manual_seed(0)
    q, k = (torch.randn(B, cq, H, W, device=dev) for _ in range(2))
    v = torch.randn(B, cv, H, W, device=dev)

    def cfg(L):
        c = cc._config(L, cq, cv, torch.float32)
        span = max(16, 1 << (L - 1).bit_length())
        for kernel, o in VARIANTS[name].items():
            c[kernel] = {**c[kernel], **{n: min(x, span) for n, x in o.items()}}
        return c

    # one config per pass: the column pass's lines have H members, the row pass's W
    out, lse = cc._fwd(q, k, v, 0.7, None)
    dout = torch.randn_like(out)
    col, row = cfg(H), cfg(W)
    print(f"{name}: dq {row['dq']}, dk/dv {row['dkdv']}", flush=True)
    grads = [cc._bwd(dout, q, k, v, out, lse, 0.7, c) for c in (col, row)]
    if dev == "cuda":
        torch.cuda.synchronize()
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    python_ref.criss_cross_attention(q64, k64, v64, 0.7).backward(dout.double())
    for which, g in zip(("column config", "row config"), grads):
        errs = [(a.double() - b.grad).abs().max().item() for a, b in zip(g, (q64, k64, v64))]
        print(f"{name} ({which} for both passes): max |error| dq/dk/dv", ["%.1e" % e for e in errs])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="base,dq64,dkdv64,both")
    ap.add_argument("--shape", default="1,8,24,17,33")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    if args.one:
        run_one(args.one, shape)
        return
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
    for name in args.variants.split(","):
        r = subprocess.run([sys.executable, __file__, "--one", name, "--shape", args.shape], env=env,
                           capture_output=True, text=True, timeout=120)
        lines = (r.stdout + r.stderr).strip().splitlines()
        print("\n".join(lines[-3:]) if r.returncode == 0 else f"{name}: FAILED (rc {r.returncode}): {lines[-1] if lines else ''}")


if __name__ == "__main__":
    main()
