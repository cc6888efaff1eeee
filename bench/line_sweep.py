"""The line-attention engine's block configs on a GPU, side by side in one run: criss-cross
attention (CCNet's sizes: B=2, Cqk 64, Cv 512, 97x97 and 65x129) and interlaced attention
(ISANet's: B=2, Cqk 256, Cv 512, block 8x8, both modes, 64x128 and 104x104), each config's
forward and forward+backward medians (triton.testing.do_bench) with their ratios to the
PyTorch reference (and, for interlaced attention, to SDPA on permuted copies, the issue's
"strongest" formulation). Before it is timed, every config's output AND gradients are checked
against the float64 reference at the same size: max |error| / max |reference| per tensor.

Usage: python bench/line_sweep.py [--ops criss_cross,interlaced] [--dtypes fp16,fp32]
                                  [--seconds 200] [--out FILE.json]
A config overrides the default blocks of one or more kernels (``fastctx.triton.<op>._config``);
``"mm"`` switches the backward to the engine's scratch form, ``"fwd_mm"`` the forward (interlaced
attention: the scores stored once, then softmax @ v as a product), ``None`` removes a kernel's config
(back to the FlashAttention-style dq and dk/dv kernels); "channels_last": False reads q, k, v
and dout in place (NCHW) instead of the ops' channels-last copies.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton.testing

import python_ref
from fastctx.bench.cases_interlaced import _sdpa_interlaced
from fastctx.triton import _line
from fastctx.triton import criss_cross as cc
from fastctx.triton import interlaced as isa

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_F32_REC = {"dq": _line.blocks(128, 64, 512, 32, 32, 64, 8), "dkdv": _line.blocks(128, 64, 512, 32, 32, 64, 8)}
_ISA16_REC = {"dq": _line.blocks(128, 256, 512, 64, 32, 128, 8), "dkdv": _line.blocks(128, 256, 512, 64, 32, 128, 8)}


def _mm(r, s, c, w):
    return _line.mm_blocks(256, r, s, c, w)


# (name, overrides); the op's default first. Block sizes are clipped to each line's length.
CONFIGS = {
    ("criss_cross", torch.float16): [
        ("default", {}),
        ("scratch bwd, mm 64x64x128", {"mm": _mm(64, 64, 128, 4), "dkdv": None}),
        ("scratch bwd, mm 64x32x128 8w", {"mm": _mm(64, 32, 128, 8), "dkdv": None}),
    ],
    ("criss_cross", torch.float32): [
        ("default (scratch bwd)", {}),
        ("session 10's dk/dv kernels", {"mm": None, **_F32_REC}),
    ],
    ("interlaced", torch.float16): [
        ("default (scratch bwd, channels-last copies)", {}),
        ("NCHW in place (session 11 run 2's default)", {"channels_last": False}),
        ("dq 64x64 8 warps", {"dq": {"num_warps": 8}}),
        ("mm 128x64x128 8w", {"mm": _mm(128, 64, 128, 8)}),
        ("dq 8 warps, mm 128x64x128 8w", {"dq": {"num_warps": 8}, "mm": _mm(128, 64, 128, 8)}),
        ("scores-once forward, mm 64x64x128", {"fwd_mm": _mm(64, 64, 128, 4)}),
        ("scores-once forward, mm 128x64x128 8w", {"fwd_mm": _mm(128, 64, 128, 8)}),
        ("recomputing bwd, Cqk 256 in one block (long groups)", {"mm": None, **{k: {**c, "BLOCK_CQK": 256} for k, c in _ISA16_REC.items()}}),
    ],
    ("interlaced", torch.float32): [
        ("default (scratch bwd, channels-last copies)", {}),
        ("NCHW in place (session 11 run 2's default)", {"channels_last": False}),
        ("scores-once forward, mm 32x32x64", {"fwd_mm": _mm(32, 32, 64, 4)}),
        ("scores-once forward, mm 64x32x64 8w", {"fwd_mm": _mm(64, 32, 64, 8)}),
        ("fwd 16 queries", {"fwd": {"BLOCK_M": 16}}),
    ],
}


def _apply(cfg: dict, overrides: dict) -> dict:
    cfg = dict(cfg)
    for kernel, o in overrides.items():
        if kernel == "channels_last":
            continue
        if o is None:
            cfg.pop(kernel, None)
        elif kernel in cfg and kernel != "mm":
            cfg[kernel] = {**cfg[kernel], **o}
        else:
            cfg[kernel] = o
    for kernel, c in cfg.items():  # clip to the line, as _line.blocks does
        span = max(16, triton.next_power_of_2(_L[0]))
        cfg[kernel] = {n: (min(x, span) if n in ("BLOCK_M", "BLOCK_N", "BLOCK_R", "BLOCK_S") else x)
                       for n, x in c.items()}
    return cfg


_L = [0]  # the current case's line length (for the clipping)


def _ms(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def _problems(op: str):
    """(label, q, k, v shapes..., the reference fn, the fastctx fwd and bwd, the default config,
    the line length, the extra "strongest" candidate or None) per size of the op."""
    if op == "criss_cross":
        for H, W in ((97, 97), (65, 129)):
            yield dict(label=f"{H}x{W}", B=2, cq=64, cv=512, H=H, W=W, L=max(H, W),
                       ref=lambda q, k, v: python_ref.criss_cross_attention(q, k, v, 1.0),
                       fwd=lambda q, k, v, cfg, cl: cc._fwd(q, k, v, 1.0, cfg, cl),
                       bwd=lambda do, q, k, v, o, s, cfg, cl: cc._bwd(do, q, k, v, o, s, 1.0, cfg, cl),
                       cfg=lambda dtype, H=H, W=W: cc._config(max(H, W), 64, 512, dtype), strongest=None)
    else:
        for H, W in ((64, 128), (104, 104)):
            for mode in ("long", "short"):
                lm = mode == "long"
                L = (H // 8) * (W // 8) if lm else 64
                sc = 256 ** -0.5
                yield dict(label=f"{H}x{W}-{mode}", B=2, cq=256, cv=512, H=H, W=W, L=L,
                           ref=lambda q, k, v, mode=mode, sc=sc: python_ref.interlaced_attention(q, k, v, (8, 8), mode, sc),
                           fwd=lambda q, k, v, cfg, cl, lm=lm, sc=sc: isa._fwd(q, k, v, 8, 8, lm, sc, cfg, cl),
                           bwd=lambda do, q, k, v, o, s, cfg, cl, lm=lm, sc=sc: isa._bwd(do, q, k, v, o, s, 8, 8, lm, sc, cfg, cl),
                           cfg=lambda dtype, L=L: isa._config(L, 256, 512, dtype),
                           strongest=lambda q, k, v, mode=mode, sc=sc: _sdpa_interlaced(q, k, v, (8, 8), mode, sc))


def _rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="interlaced,criss_cross")
    ap.add_argument("--dtypes", default="fp16,fp32")
    ap.add_argument("--seconds", type=float, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    for op in args.ops.split(","):
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            for pb in _problems(op):
                if time.time() - t0 > args.seconds:
                    print("deadline: the rest left out")
                    break
                _L[0] = pb["L"]
                g = torch.Generator(device="cuda").manual_seed(0)
                B, cq, cv, H, W = pb["B"], pb["cq"], pb["cv"], pb["H"], pb["W"]
                q, k = (torch.randn(B, cq, H, W, device="cuda", dtype=dtype, generator=g) for _ in range(2))
                v, dout = (torch.randn(B, cv, H, W, device="cuda", dtype=dtype, generator=g) for _ in range(2))
                x64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
                want = pb["ref"](*x64)
                want_g = torch.autograd.grad(want, x64, dout.double())
                qr, kr, vr = (t.detach().requires_grad_(True) for t in (q, k, v))

                def fb(fn):
                    def run():
                        o = fn(qr, kr, vr)
                        o.backward(dout)
                    return run

                base = {"reference": pb["ref"]}
                if pb["strongest"] is not None:
                    base["sdpa"] = pb["strongest"]
                times = {n: (_ms(lambda f=f: f(q, k, v)), _ms(fb(f))) for n, f in base.items()}
                head = f"{op} {dname} {pb['label']}: " + ", ".join(
                    f"{n} fwd {a:.3f} fwd+bwd {b:.3f} ms" for n, (a, b) in times.items())
                print(head, flush=True)
                ref_f, ref_fb = times["reference"]
                for name, overrides in CONFIGS.get((op, dtype), [("default", {})]):
                    if time.time() - t0 > args.seconds:
                        break
                    cfg = _apply(pb["cfg"](dtype), overrides)
                    row = {"op": op, "dtype": dname, "size": pb["label"], "config": name, "blocks": cfg,
                           "ref_fwd_ms": ref_f, "ref_fwd_bwd_ms": ref_fb}
                    if "sdpa" in times:
                        row.update(sdpa_fwd_ms=times["sdpa"][0], sdpa_fwd_bwd_ms=times["sdpa"][1])
                    cl = overrides.get("channels_last", True)  # the ops read channels-last copies by default

                    def fwd(cfg=cfg, cl=cl):
                        return pb["fwd"](q, k, v, cfg, cl)

                    def step(cfg=cfg, cl=cl):
                        o, s = pb["fwd"](q, k, v, cfg, cl)
                        return o, pb["bwd"](dout, q, k, v, o, s, cfg, cl)

                    try:
                        out, grads = step()
                        err = [_rel_err(out, want)] + [_rel_err(a, b) for a, b in zip(grads, want_g)]
                        f_ms, fb_ms = _ms(fwd), _ms(step)
                        row.update(fwd_ms=f_ms, fwd_bwd_ms=fb_ms, rel_err_out_dq_dk_dv=err,
                                   x_ref_fwd_bwd=ref_fb / fb_ms)
                        extra = ""
                        if "sdpa" in times:
                            row["x_sdpa_fwd_bwd"] = times["sdpa"][1] / fb_ms
                            extra = f", {row['x_sdpa_fwd_bwd']:.2f}x sdpa"
                        print(f"  {name}: fwd {f_ms:.3f} fwd+bwd {fb_ms:.3f} ms ({ref_fb / fb_ms:.2f}x ref{extra}) "
                              f"rel err out/dq/dk/dv {' '.join(f'{e:.1e}' for e in err)}", flush=True)
                    except Exception as e:  # a config that does not compile (shared memory) or faults
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                        print(f"  {name}: {row['error']}", flush=True)
                        if "illegal" in str(e):
                            raise
                    rows.append(row)
                    if args.out:
                        with open(args.out, "w") as f:
                            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
