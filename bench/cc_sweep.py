"""Criss-cross attention on a GPU: the Triton kernels' block configs side by side with the
PyTorch reference (mmcv's einsum formulation), CCNet's sizes (B=2, Cqk 64, Cv 512), each
candidate's forward+backward median (triton.testing.do_bench) in one run, with its ratio to the
reference, and each config's output checked against the reference first.

Usage: python bench/cc_sweep.py [--seconds 200] [--out FILE.json]
A config overrides the default blocks of one or more kernels; `channels_last` says whether the
kernels read channels-last copies of the NCHW inputs (fastctx.triton.criss_cross).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton.testing

import python_ref
from fastctx.triton import criss_cross as cc

SIZES = [(97, 97), (65, 129)]
#: time the default config on NCHW inputs too (session 10 run 1: 1.5-2.3x slower, left out since)
CHANNELS_LAST_BOTH = False
# (name, {kernel: overrides of fastctx.triton.criss_cross._config}); the default first
CONFIGS = {
    torch.float16: [
        ("default", {}),
        ("run 2's default (dk/dv 32 queries)", {"dkdv": {"BLOCK_M": 32}}),
        ("fwd CV256", {"fwd": {"BLOCK_CV": 256}}),
    ],
    torch.float32: [
        ("default", {}),
        ("run 2's forward (64 queries x 64 Cv)", {"fwd": {"BLOCK_M": 64, "BLOCK_CV": 64}}),
        ("fwd N64", {"fwd": {"BLOCK_N": 64}}),
    ],
    torch.bfloat16: [("default", {})],
}


def _cfg(H, W, dtype, overrides):
    cfg = cc._config(max(H, W), 64, 512, dtype)
    for kernel, o in overrides.items():
        cfg[kernel] = {**cfg[kernel], **o}
    return cfg


def _ms(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for H, W in SIZES:
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k = (torch.randn(2, 64, H, W, device="cuda", dtype=dtype, generator=g) for _ in range(2))
            v = torch.randn(2, 512, H, W, device="cuda", dtype=dtype, generator=g)
            dout = torch.randn(2, 512, H, W, device="cuda", dtype=dtype, generator=g)
            qr, kr, vr = (t.detach().requires_grad_(True) for t in (q, k, v))
            want = python_ref.criss_cross_attention(qr, kr, vr)

            def ref_fb():
                o = python_ref.criss_cross_attention(qr, kr, vr)
                o.backward(dout)

            ref_f = _ms(lambda: python_ref.criss_cross_attention(q, k, v))
            ref_fb_ms = _ms(ref_fb)
            print(f"{dtype} {H}x{W} reference fwd {ref_f:.3f} fwd+bwd {ref_fb_ms:.3f} ms", flush=True)
            for n, (name, overrides) in enumerate(CONFIGS[dtype]):
                for transpose in (True, False) if n == 0 and CHANNELS_LAST_BOTH else (True,):
                    if time.time() - t0 > args.seconds:
                        print("deadline: the rest left out")
                        break
                    cfg = _cfg(H, W, dtype, overrides)
                    c = name
                    row = {"dtype": str(dtype), "size": f"{H}x{W}", "config": name, "blocks": cfg,
                           "channels_last": transpose}
                    try:
                        out, lse = cc._fwd(q, k, v, 1.0, cfg, transpose)
                        err = (out.float() - want.float()).abs().max().item()
                        fwd = _ms(lambda: cc._fwd(q, k, v, 1.0, cfg, transpose))

                        def fb():
                            o, s = cc._fwd(q, k, v, 1.0, cfg, transpose)
                            cc._bwd(dout, q, k, v, o, s, 1.0, cfg, transpose)

                        fb_ms = _ms(fb)
                        row.update(fwd_ms=fwd, fwd_bwd_ms=fb_ms, max_err=err,
                                   x_ref_fwd=ref_f / fwd, x_ref_fwd_bwd=ref_fb_ms / fb_ms)
                        print(f"  {c} channels_last={transpose}: fwd {fwd:.3f} ({ref_f / fwd:.2f}x) "
                              f"fwd+bwd {fb_ms:.3f} ms ({ref_fb_ms / fb_ms:.2f}x ref) max|err| {err:.2e}",
                              flush=True)
                    except Exception as e:  # a config that does not compile (shared memory)
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                        print(f"  {c} channels_last={transpose}: {row['error']}", flush=True)
                    row.update(ref_fwd_ms=ref_f, ref_fwd_bwd_ms=ref_fb_ms)
                    rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
