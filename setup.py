"""Build fastctx and its compiled extension ``fastctx._C``.

The C++ (CPU) sources are always built. The CUDA sources are built too when torch is a CUDA build
and nvcc is found (``FASTCTX_BUILD_CUDA=auto``, the default), always (``=1``: fail if impossible)
or never (``=0``). See the README's table of environment variables.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

# torch finds nvcc through CUDA_HOME or PATH; a PATH shim (e.g. /usr/local/bin/nvcc) would make it
# guess the wrong toolkit root, so prefer the real toolkit folder when the variable is unset.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    for root in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(root, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = root
            break

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    mode = os.environ.get("FASTCTX_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTCTX_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    have = torch.version.cuda is not None and CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    if mode == "1" and not have:
        raise SystemExit(
            "FASTCTX_BUILD_CUDA=1 but torch is not a CUDA build or nvcc was not found "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
        )
    return have if mode == "auto" else mode == "1"


def extensions():
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # the C++ standard: whatever this torch requires (BuildExtension adds it). -Wno-psabi: the CPU
    # kernels' baseline builds pass 32-byte vector types between their own inline functions, and
    # GCC notes that this ABI changed in GCC 4.6 (nothing crosses a library boundary).
    cxx = opt + ["-fopenmp", "-Wno-psabi"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include = [os.path.join(HERE, "csrc")]
    if want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = opt + ["--use_fast_math", "-lineinfo", "-DFASTCTX_WITH_CUDA"]
        return [
            CUDAExtension(
                "fastctx._C",
                sources,
                include_dirs=include,
                extra_compile_args={"cxx": cxx + ["-DFASTCTX_WITH_CUDA"], "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "fastctx._C",
            sources,
            include_dirs=include,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    name="fastctx",
    version="0.1.0",
    description="Fused GPU/CPU kernels for the context-aggregation operators of semantic segmentation",
    packages=find_packages(include=["fastctx", "fastctx.*", "python_ref", "python_ref.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "numpy"],
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["fastctx=fastctx.cli:main"]},
)
