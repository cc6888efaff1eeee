"""mmsegmentation plugin: fastctx decode heads in mmseg's ``MODELS`` registry.

In a config, add the import and change one ``type=`` line; every other key stays::

    custom_imports = dict(imports=['fastctx.integrations.mmseg'], allow_failed_imports=False)
    model = dict(decode_head=dict(type='FastCCHead', ...))   # was type='CCHead'

``Fast<X>Head`` is a subclass of mmseg's ``<X>Head``: it accepts the same keys (and
``fastctx_backend=None``, a backend name for the fastctx ops), builds exactly the original
submodules, then swaps its context modules for fastctx's with :func:`fastctx.swap` (strict), so
its ``state_dict`` is the original head's (a checkpoint trained with ``<X>Head`` loads
unchanged) and it computes the same logits.

Heads: ``FastCCHead`` (CCHead: ``cca`` -> :class:`fastctx.nn.CrissCrossAttention`),
``FastOCRHead`` (OCRHead: ``spatial_gather_module`` -> :class:`fastctx.nn.SpatialGather`,
``object_context_block`` -> :class:`fastctx.nn.ObjectAttention`), ``FastISAHead`` (ISAHead:
``global_relation`` / ``local_relation`` -> fastctx's, and its padding/permute forward -> the
fused interlaced attention), ``FastANNHead`` (ANNHead: ``fusion`` -> :class:`fastctx.nn.AFNB`,
``context`` -> :class:`fastctx.nn.APNB`).
Adding one is a line, once :mod:`fastctx.swap` recognises its modules::

    FastANNHead = fast_head(ANNHead, "FastANNHead", swaps=("fusion", "context"))

A head whose own forward needs fastctx too is written out, as ``FastISAHead`` is (its relations
are rebuilt by :func:`fastctx.swap.isa_relations` and its forward is
:class:`fastctx.swap.FastISAForward`'s).
"""

from __future__ import annotations

from torch import nn

from fastctx.backends import _check_name
from fastctx.integrations import require
from fastctx.swap import FastISAForward, NotSwappable, SwapError, isa_relations, swap

require("mmseg.models", "fastctx.integrations.mmseg", "mmsegmentation")

from mmseg.models.decode_heads import ANNHead, CCHead, ISAHead, OCRHead  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402

__all__ = ["FastANNHead", "FastCCHead", "FastISAHead", "FastOCRHead", "fast_head"]


def fast_head(base: type[nn.Module], name: str, swaps: tuple[str, ...]) -> type[nn.Module]:
    """Make ``name``, a subclass of the mmseg head ``base`` whose submodules at the paths
    ``swaps`` are swapped for fastctx's when it is built, and register it in mmseg's ``MODELS``.

    Args:
        base (type): the mmseg head class (e.g. ``CCHead``).
        name (str): the registered name (e.g. ``"FastCCHead"``).
        swaps (tuple[str, ...]): the submodule paths that must be swapped (e.g. ``("cca",)``);
            building fails with a RuntimeError when one is not.
    """

    class FastHead(base):
        def __init__(self, *args, fastctx_backend: str | None = None, **kwargs) -> None:
            base.__init__(self, *args, **kwargs)
            _, report = swap(self, backend=fastctx_backend, strict=True)
            missing = sorted(set(swaps) - {e.path for e in report.swapped})
            if missing:
                raise RuntimeError(f"fastctx.integrations.mmseg.{name}: {missing} not swapped\n{report}")
            self.fastctx_backend = fastctx_backend

    FastHead.__name__ = FastHead.__qualname__ = name
    FastHead.__module__ = __name__
    FastHead.__doc__ = (
        f"mmseg's {base.__name__} on fastctx ops: same config keys (plus ``fastctx_backend``), "
        f"same state_dict, same logits; swapped: {', '.join(swaps)}."
    )
    MODELS.register_module(name=name, module=FastHead, force=True)
    return FastHead


FastCCHead = fast_head(CCHead, "FastCCHead", swaps=("cca",))
FastANNHead = fast_head(ANNHead, "FastANNHead", swaps=("fusion", "context"))
FastOCRHead = fast_head(OCRHead, "FastOCRHead", swaps=("spatial_gather_module", "object_context_block"))


class FastISAHead(FastISAForward, ISAHead):
    """mmseg's ISAHead on fastctx's interlaced attention: same config keys (plus
    ``fastctx_backend``), same state_dict, same logits; ``global_relation`` / ``local_relation``
    are :class:`fastctx.nn.interlaced.ISASelfAttentionBlock` s around the original projections
    and the forward is :class:`fastctx.swap.FastISAForward`'s (no permutes)."""

    def __init__(self, *args, fastctx_backend: str | None = None, **kwargs) -> None:
        ISAHead.__init__(self, *args, **kwargs)
        if fastctx_backend is not None:
            _check_name(fastctx_backend, "fastctx.integrations.mmseg.FastISAHead")
        try:
            global_relation, local_relation = isa_relations(self)
        except NotSwappable as e:
            raise SwapError(f"fastctx.integrations.mmseg.FastISAHead: cannot run on fastctx: {e}") from None
        self.global_relation, self.local_relation = global_relation, local_relation
        self.fastctx_backend = fastctx_backend


MODELS.register_module(name="FastISAHead", module=FastISAHead, force=True)
