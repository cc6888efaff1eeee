"""Compile every Triton kernel specialization fastctx's ops launch, for sm_90 (H100/H200), on a
machine WITHOUT a GPU: a mock triton driver reports GPUTarget("cuda", 90, 32), every launch becomes a
warmup (compile-only) call, and each compiled kernel's PTX goes through the bundled ptxas -v for
registers / spills. Catches before a GPU lease what the interpreter accepts and the compiler does
not (a tl.dot dimension under 16, shared memory over the per-block limit) and reports spills
(session 9 found the pyramid pool spilling 24 KB per thread this way, and fixed it).

Usage: python bench/compile_check.py REPO_DIR [--ops a,b] [--no-bench] [--no-tests]
           [--dtypes float32,float16,bfloat16] [--report PATH]
Drives the ops with CPU tensors and backend="triton" (outputs are garbage: nothing launches) at
the quick benchmark shapes and a set of the tests' odd shapes, forward and backward. Run it with
the triton the GPU machine has (3.6 for the lent H100/H200 machines) to see what it will compile;
3.8 works too. About 10 minutes for everything on 2 cores; compiled kernels are cached.
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import types

ap = argparse.ArgumentParser()
ap.add_argument("repo")
ap.add_argument("--report", default="compile_check_report.txt")
ap.add_argument("--ops", default=None, help="only these ops' benchmark cases (comma-separated)")
ap.add_argument("--no-bench", action="store_true")
ap.add_argument("--no-tests", action="store_true")
ap.add_argument("--dtypes", default="float32,float16,bfloat16")
args = ap.parse_args()
REPO = os.path.abspath(args.repo)
sys.path.insert(0, REPO)
os.environ.pop("TRITON_INTERPRET", None)
os.environ["FASTCTX_CHECK_NAN"] = "0"
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fastctx-compile-check"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver_cfg  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

MAX_SHARED = 232448  # sm_90 opt-in shared memory per block
N_SM = 132
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

torch.set_num_threads(1)


# ------------------------------------------------------------------ mock driver
class _Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED, "multiprocessor_count": N_SM, "sm_clock_rate": 1980000,
                "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def load_binary(self, *a, **k):
        raise RuntimeError("mock driver: no launches")


class MockDriver:
    def __init__(self):
        self.utils = _Utils()

    def is_active(self):
        return True

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("mock driver")

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("mock driver")

    def clear_cache(self, cache):
        pass


_driver_cfg.set_active(MockDriver())

# ------------------------------------------------------------------ recording launches
RECORDS = {}  # key -> dict
CURRENT_CASE = ["?"]
PTXAS_CACHE = {}


def _ptxas_info(ptx: str, name: str):
    h = hash(ptx)
    if h in PTXAS_CACHE:
        return PTXAS_CACHE[h]
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = "sm_90a" if ".target sm_90a" in ptx else "sm_90"
        p = subprocess.run([PTXAS, "-lineinfo", "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
    log = p.stdout + p.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    info = {"regs": int(regs.group(1)) if regs else None,
            "spill_st": int(spill.group(1)) if spill else None,
            "spill_ld": int(spill.group(2)) if spill else None,
            "stack": int(stack.group(1)) if stack else None,
            "ptxas_rc": p.returncode, "ptxas_log": log if p.returncode else ""}
    PTXAS_CACHE[h] = info
    return info


def _max_threads(regs):
    # 64K registers per block; allocation granularity 256 registers per warp
    if not regs:
        return 1024
    per_warp = -(-regs * 32 // 256) * 256
    return min(1024, (65536 // per_warp) * 32)


def _dtype_of(vals):
    for v in vals:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return str(v.dtype).replace("torch.", "")
    return "-"


_orig_run = JITFunction.run


def _patched_run(self, *a, grid, warmup, **kw):
    names = self.arg_names
    bound = dict(zip(names, a))
    bound.update({k: v for k, v in kw.items() if k in names})
    constexprs = {n: bound.get(n) for i, n in enumerate(names) if i in self.constexprs}
    nw = kw.get("num_warps", 4)
    ns = kw.get("num_stages", 3)
    dtype = _dtype_of([bound[n] for n in names if n in bound])
    g = grid
    try:
        if callable(g):
            g = g(bound)
        g = tuple(int(x) for x in g)
    except Exception:
        g = None
    # specialization of ints (==1 / %16) matters too: include int values's class in the key
    ints = tuple((n, (1 if v == 1 else 16 if v % 16 == 0 else 0)) for n, v in bound.items()
                 if isinstance(v, int) and not isinstance(v, bool) and names.index(n) not in self.constexprs)
    key = (self.__name__, dtype, tuple(sorted((k, repr(v)) for k, v in constexprs.items())), nw, ns, ints)
    rec = RECORDS.get(key)
    if rec is None:
        rec = RECORDS[key] = {"kernel": self.__name__, "file": os.path.relpath(inspect.getsourcefile(self.fn), REPO),
                              "dtype": dtype, "constexprs": constexprs, "num_warps": nw, "num_stages": ns,
                              "cases": [], "grids": set(), "status": None}
        t0 = time.time()
        try:
            k = _orig_run(self, *a, grid=grid, warmup=True, **kw)
            if hasattr(k, "result"):
                k = k.result()
            md = k.metadata
            rec["shared"] = md.shared
            rec["num_warps"] = md.num_warps
            rec["num_stages"] = md.num_stages
            info = _ptxas_info(k.asm["ptx"], self.__name__)
            rec.update(info)
            probs = []
            if md.shared > MAX_SHARED:
                probs.append(f"shared {md.shared} > {MAX_SHARED}: OutOfResources at launch")
            if info["regs"] and md.num_warps * 32 > _max_threads(info["regs"]):
                probs.append(f"{info['regs']} regs x {md.num_warps * 32} threads > 64K regs: launch fails")
            if info["ptxas_rc"]:
                probs.append("ptxas -v rerun failed: " + info["ptxas_log"][-500:])
            rec["status"] = "FAILED: " + "; ".join(probs) if probs else "OK"
        except Exception as e:  # compile error
            tb = traceback.format_exc()
            msg = f"{type(e).__name__}: {e}"
            rec["status"] = "FAILED: " + msg
            rec["traceback"] = tb
        rec["compile_s"] = round(time.time() - t0, 1)
        print(f"  [{rec['compile_s']:5.1f}s] {rec['kernel']:<28} {dtype:<9} nw={rec['num_warps']} ns={rec['num_stages']} "
              f"{_fmt_cx(constexprs)} shared={rec.get('shared')} regs={rec.get('regs')} spill={rec.get('spill_st')} "
              f"-> {rec['status'][:200]}", flush=True)
    if CURRENT_CASE[0] not in rec["cases"]:
        rec["cases"].append(CURRENT_CASE[0])
    if g is not None:
        rec["grids"].add(g)
        if len(g) > 1 and (max(g[1:]) > 65535 or g[0] > 2**31 - 1):
            rec["status"] = (rec["status"] or "") + f" | FAILED: grid {g} exceeds CUDA limits (y,z <= 65535)"
        if min(g) == 0:
            rec.setdefault("zero_grid", g)
    return None  # nothing launched


def _fmt_cx(cx):
    return ",".join(f"{k}={v}" for k, v in cx.items())


JITFunction.run = _patched_run

# ------------------------------------------------------------------ fastctx, made to take CPU tensors
import fastctx  # noqa: E402
import fastctx.backends as _fb  # noqa: E402
import importlib  # noqa: E402
import pkgutil  # noqa: E402
import fastctx.triton as _ft  # noqa: E402

TRITON_MODS = [importlib.import_module(f"fastctx.triton.{m.name}") for m in pkgutil.iter_modules(_ft.__path__)]
from fastctx.triton import _common  # noqa: E402

assert not _common._INTERPRET, "kernels were decorated under the interpreter"

_orig_why_not = _fb.why_not


def _why_not(op, backend, device_type, dtype):
    if backend == "triton" and device_type == "cpu":
        device_type = "cuda"
    return _orig_why_not(op, backend, device_type, dtype)


_fb.why_not = _why_not

# emulate an H200's SM count in the host code's split / group heuristics (device.type == "cuda")
torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(multi_processor_count=N_SM)
_FAKE_CUDA = types.SimpleNamespace(type="cuda", index=0)
for _m in TRITON_MODS:
    for _name in ("_n_groups", "_n_split"):
        _f = getattr(_m, _name, None)
        if _f is None:
            continue

        def _wrap(f):
            def g(*a, **k):
                a = tuple(_FAKE_CUDA if isinstance(x, torch.device) else x for x in a)
                return f(*a, **k)
            return g
        setattr(_m, _name, _wrap(_f))

# ------------------------------------------------------------------ drivers
DTYPES = [getattr(torch, d) for d in args.dtypes.split(",")]
CASE_ERRORS = []


def _fwd_bwd(fn, inputs):
    ins = [t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
           for t in inputs]
    out = fn(*ins)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    outs = [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]
    req = [t for t in ins if isinstance(t, torch.Tensor) and t.requires_grad]
    if outs and req:
        torch.autograd.grad(outs, req, [torch.ones_like(o) for o in outs], allow_unused=True)


def run_case(name, fn, make):
    CURRENT_CASE[0] = name
    print(f"case {name}", flush=True)
    try:
        with torch.no_grad():
            pass
        _fwd_bwd(fn, make())
    except Exception as e:
        CASE_ERRORS.append((name, f"{type(e).__name__}: {e}", traceback.format_exc()))
        print(f"  !! host error: {type(e).__name__}: {str(e)[:300]}", flush=True)


def bench_cases():
    from fastctx.bench.cases import CASES, FULL_ONLY
    for op, make_cases in CASES.items():
        if op in FULL_ONLY or (args.ops and op not in args.ops.split(",")):
            continue
        for case in make_cases(True):
            for dt in DTYPES:
                if "triton" in case.candidates:
                    fn = case.candidates["triton"]
                elif op.startswith("isnet"):
                    def fn(*x, c=case):
                        with fastctx.use_backend("triton"):
                            return c.candidates["reduced"](*x)
                else:
                    continue
                run_case(f"bench:{op}:{case.name}:{str(dt)[6:]}", fn,
                         lambda c=case, dt=dt: c.make_inputs(dt, torch.device("cpu")))


def _rn(*s, dt):
    return lambda: torch.randn(*s).to(dt)


def test_cases():
    T = "triton"
    for dt in DTYPES:
        d = str(dt)[6:]
        # criss_cross: (B, Cqk, Cv, H, W)
        for B, cq, cv, H, W in [(1, 3, 5, 1, 1), (2, 3, 5, 1, 7), (2, 3, 5, 7, 1), (2, 5, 7, 13, 9),
                                (1, 8, 24, 17, 33), (1, 8, 64, 33, 65), (1, 4, 6, 97, 97)]:
            run_case(f"test:cc:B{B}-C{cq}x{cv}-{H}x{W}:{d}",
                     lambda q, k, v: fastctx.criss_cross_attention(q, k, v, 0.7, backend=T),
                     lambda: [torch.randn(B, cq, H, W).to(dt), torch.randn(B, cq, H, W).to(dt), torch.randn(B, cv, H, W).to(dt)])
        # interlaced: (B, Cqk, Cv, H, W, block), modes
        for B, cq, cv, H, W, blk in [(2, 8, 12, 16, 24, (8, 8)), (1, 5, 7, 9, 10, (3, 5)), (2, 3, 4, 5, 7, (1, 1)),
                                     (1, 6, 5, 6, 4, (6, 4)), (2, 24, 40, 12, 20, (4, 4)), (1, 130, 260, 24, 32, (8, 8)),
                                     (1, 136, 24, 4, 6, (2, 3)), (1, 6, 5, 12, 15, (2, 1)), (1, 72, 40, 4, 6, (2, 3))]:
            for mode in ("long", "short"):
                run_case(f"test:isa:B{B}-C{cq}x{cv}-{H}x{W}-b{blk}-{mode}:{d}",
                         lambda q, k, v, blk=blk, mode=mode: fastctx.interlaced_attention(q, k, v, blk, mode, backend=T),
                         lambda: [torch.randn(B, cq, H, W).to(dt), torch.randn(B, cq, H, W).to(dt), torch.randn(B, cv, H, W).to(dt)])
        # pyramid_pool
        for (B, C, H, W), sc in [((2, 5, 7, 5), (1, 3, 6, 8)), ((2, 5, 7, 5), (1,)), ((2, 5, 7, 5), (2, 5)),
                                 ((1, 3, 7, 5), (10, 3, 3)), ((1, 3, 1, 1), (1, 3, 6, 8)), ((3, 20, 33, 17), (2, 5)),
                                 ((2, 13, 97, 97), (1, 3, 6, 8)), ((1, 7, 97, 97), (2, 5)), ((1, 100, 9, 9), (1, 3, 6, 8, 12))]:
            run_case(f"test:pp:B{B}-C{C}-{H}x{W}-s{sc}:{d}",
                     lambda x, sc=sc: fastctx.pyramid_pool(x, sc, backend=T), lambda: [torch.randn(B, C, H, W).to(dt)])
        # pyramid_attention: (B, Cqk, Cv, Hq, Wq, H, W)
        for (B, cq, cv, hq, wq, H, W), sc in [((2, 3, 13, 7, 5, 7, 5), (1, 3, 6, 8)), ((1, 5, 7, 1, 1, 1, 1), (1,)),
                                               ((2, 20, 24, 9, 13, 33, 17), (2, 5)), ((1, 6, 5, 4, 3, 7, 5), (1, 3, 6, 8)),
                                               ((1, 13, 24, 20, 11, 97, 97), (1, 3, 6, 8))]:
            run_case(f"test:pa:B{B}-C{cq}x{cv}-{hq}x{wq}-{H}x{W}-s{sc}:{d}",
                     lambda q, k, v, sc=sc: fastctx.pyramid_attention(q, k, v, sc, 0.6, backend=T),
                     lambda: [torch.randn(B, cq, hq, wq).to(dt), torch.randn(B, cq, H, W).to(dt), torch.randn(B, cv, H, W).to(dt)])
        # region_attention: (B, Cqk, Cv, H, W, S), with and without bias
        for B, cq, cv, H, W, S in [(1, 3, 5, 1, 1, 1), (2, 3, 13, 7, 5, 19), (2, 20, 24, 13, 9, 40),
                                   (1, 13, 3, 5, 7, 171), (2, 64, 96, 33, 65, 150), (1, 300, 520, 9, 11, 7)]:
            for bias in (False, True):
                run_case(f"test:ra:B{B}-C{cq}x{cv}-{H}x{W}-S{S}-bias{int(bias)}:{d}",
                         (lambda q, k, v, b: fastctx.region_attention(q, k, v, 0.8, b, backend=T)) if bias else
                         (lambda q, k, v: fastctx.region_attention(q, k, v, 0.8, backend=T)),
                         lambda bias=bias: [torch.randn(B, cq, H, W).to(dt), torch.randn(B, cq, S).to(dt), torch.randn(B, cv, S).to(dt)]
                         + ([torch.randn(B, S).to(dt)] if bias else []))
        # spatial_gather: (B, C, K, H, W)
        for B, C, K, H, W in [(1, 3, 1, 1, 1), (2, 5, 19, 7, 5), (1, 13, 171, 5, 7), (2, 20, 7, 33, 65),
                              (2, 48, 150, 33, 65), (1, 24, 19, 97, 97), (1, 520, 19, 9, 9)]:
            run_case(f"test:sg:B{B}-C{C}-K{K}-{H}x{W}:{d}",
                     lambda f, lg: fastctx.spatial_gather(f, lg, 0.9, backend=T),
                     lambda: [torch.randn(B, C, H, W).to(dt), torch.randn(B, K, H, W).to(dt)])
        # semantic_pool / semantic_pool_regions: (B, C, K, H, W)
        for B, C, K, H, W in [(2, 5, 4, 7, 5), (1, 3, 1, 5, 7), (2, 13, 19, 9, 11), (1, 6, 150, 11, 13), (1, 16, 19, 33, 65),
                              (1, 520, 19, 9, 9)]:
            run_case(f"test:sp:B{B}-C{C}-K{K}-{H}x{W}:{d}",
                     lambda f, lg: fastctx.semantic_pool(f, lg, backend=T),
                     lambda: [torch.randn(B, C, H, W).to(dt), torch.randn(B, K, H, W).to(dt)])
            run_case(f"test:spr:B{B}-C{C}-K{K}-{H}x{W}:{d}",
                     lambda f, lg: fastctx.semantic_pool_regions(f, lg, backend=T)[0],
                     lambda: [torch.randn(B, C, H, W).to(dt), torch.randn(B, K, H, W).to(dt)])


t_start = time.time()
if not args.no_bench:
    bench_cases()
if not args.no_tests:
    test_cases()

# ------------------------------------------------------------------ report
# which @triton.jit kernels were never compiled
all_kernels = set()
for m in TRITON_MODS:
    for n, o in vars(m).items():
        f = getattr(o, "fn", o)  # Heuristics -> JITFunction
        if isinstance(f, JITFunction) and n.endswith("kernel"):
            all_kernels.add(f.__name__)
seen = {r["kernel"] for r in RECORDS.values()}

lines = []
P = lines.append
P(f"fastctx Triton compile check for sm_90 (GPUTarget cuda 90), triton {triton.__version__}, torch {torch.__version__}")
P(f"repo {REPO}; {len(RECORDS)} specializations; {time.time() - t_start:.0f} s; max shared {MAX_SHARED}; SMs emulated {N_SM}")
P("")
hdr = f"{'kernel':<26} {'dtype':<8} {'nw':>2} {'ns':>2} {'shared':>7} {'regs':>4} {'spill':>9} {'status':<6} constexprs"
P(hdr)
P("-" * len(hdr))
fails = []
flags = []
for r in sorted(RECORDS.values(), key=lambda r: (r["file"], r["kernel"], r["dtype"], _fmt_cx(r["constexprs"]))):
    st = "OK" if r["status"] == "OK" else "FAILED"
    sp = f"{r.get('spill_st')}/{r.get('spill_ld')}" if r.get("spill_st") is not None else "-"
    P(f"{r['kernel']:<26} {r['dtype']:<8} {r['num_warps']:>2} {r['num_stages']:>2} {str(r.get('shared', '-')):>7} "
      f"{str(r.get('regs', '-')):>4} {sp:>9} {st:<6} {_fmt_cx(r['constexprs'])}")
    if st != "OK":
        fails.append(r)
    if (r.get("spill_st") or 0) > 0 or (r.get("shared") or 0) > MAX_SHARED:
        flags.append(r)
P("")
P(f"FAILURES: {len(fails)}")
for r in fails:
    P(f"* {r['kernel']} ({r['file']}) {r['dtype']} nw={r['num_warps']} ns={r['num_stages']} {_fmt_cx(r['constexprs'])}")
    P(f"  status: {r['status']}")
    P(f"  cases: {', '.join(r['cases'][:6])}{' ...' if len(r['cases']) > 6 else ''}")
    if r.get("traceback"):
        tb = r["traceback"]
        P("  traceback (tail):")
        P("    " + "\n    ".join(tb.strip().splitlines()[-25:]))
P("")
P(f"SPILLS / SHARED > {MAX_SHARED}: {len(flags)}")
for r in flags:
    P(f"* {r['kernel']} {r['dtype']} nw={r['num_warps']} ns={r['num_stages']} {_fmt_cx(r['constexprs'])}: "
      f"shared={r.get('shared')} regs={r.get('regs')} spill stores/loads={r.get('spill_st')}/{r.get('spill_ld')} "
      f"stack={r.get('stack')}  cases: {', '.join(r['cases'][:3])}")
P("")
P(f"kernels never compiled: {sorted(all_kernels - seen)}")
P(f"HOST ERRORS (op raised outside the kernel compile): {len(CASE_ERRORS)}")
for name, msg, tb in CASE_ERRORS:
    P(f"* {name}: {msg[:400]}")
    P("    " + "\n    ".join(tb.strip().splitlines()[-6:]))
P("")
P("Grids per kernel (max over cases):")
for r in sorted(RECORDS.values(), key=lambda r: r["kernel"]):
    if r["grids"]:
        gm = tuple(max(g[i] if i < len(g) else 1 for g in r["grids"]) for i in range(3))
        P(f"  {r['kernel']:<26} {r['dtype']:<8} {_fmt_cx(r['constexprs'])}: max grid {gm}"
          + (f"  ZERO-SIZE GRID {r['zero_grid']}" if r.get("zero_grid") else ""))
text = "\n".join(lines)
print("\n" + text)
with open(args.report, "w") as f:
    f.write(text + "\n")
sys.exit(1 if fails or CASE_ERRORS else 0)
