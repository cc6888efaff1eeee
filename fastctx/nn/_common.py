"""Small helpers shared by the fastctx modules."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

_M = TypeVar("_M", bound=nn.Module)


def bare(cls: type[_M]) -> _M:
    """An instance of the module class ``cls`` with ``nn.Module``'s state set up but not
    ``cls.__init__`` run: the start of every ``from_modules``, which then sets the fields
    around existing submodules."""
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    return m
