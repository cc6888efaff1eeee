"""The benchmark-and-parity report (``fastctx bench``). See :mod:`fastctx.bench.runner`."""

from fastctx.bench.report import markdown, write
from fastctx.bench.runner import run

__all__ = ["markdown", "run", "write"]
