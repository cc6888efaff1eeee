"""The two ceilings of a CUDA device (METHOD.md: measure them once on the machine): device-to-
device copy bandwidth (bytes read plus written) and matrix-product rates on random data, each the
median of triton.testing.do_bench. Run by bench/gpu_check.sh; prints one line per ceiling."""

import torch
from triton.testing import do_bench


def _copy(dev: torch.device) -> None:
    src = torch.randn(1 << 28, device=dev)  # 1 GiB of float32
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    print(f"copy {2 * src.numel() * 4 / ms / 1e9:8.1f} TB/s  (1 GiB float32, read + write, median {ms:.3f} ms)")


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_ceilings: no CUDA device")
    dev = torch.device("cuda")
    _copy(dev)
    m = 8192
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("fp16", torch.float16, False), ("bf16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = torch.randn(m, m, device=dev, dtype=dtype), torch.randn(m, m, device=dev, dtype=dtype)
        ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
        print(f"matmul {name} {2 * m**3 / ms / 1e9:8.1f} TFLOP/s  ({m}^3, median {ms:.3f} ms)")
    torch.backends.cuda.matmul.allow_tf32 = False


if __name__ == "__main__":
    main()
