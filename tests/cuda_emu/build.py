"""Builds tests/cuda_emu/kernels_emu.cpp (the CUDA device code of csrc/cuda under the CPU emulation
of emu.h) once per test session, into build/cuda_emu (git-ignored; torch's loader rebuilds only
when a source or a flag changed)."""

from __future__ import annotations

import functools
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "tests", "cuda_emu")


@functools.cache
def _build():
    from torch.utils.cpp_extension import load

    build = os.path.join(ROOT, "build", "cuda_emu")
    os.makedirs(build, exist_ok=True)
    return load(
        name="fastctx_cuda_emu",
        sources=[os.path.join(HERE, "kernels_emu.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc"), HERE],
        extra_cflags=["-O1", "-pthread"],
        extra_ldflags=["-pthread"],
        build_directory=build,
    )


def emu_module():
    """The emulation's extension module (fails the test, with the reason, if it cannot build)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.fail("a C++ compiler is needed to build the CUDA emulation")
    return _build()
