"""sssegmentation plugin: fastctx segmentors in ssseg's ``SegmentorBuilder``.

Import it before building, then change one ``type`` in the segmentor config::

    import fastctx.integrations.sssegmentation
    SEGMENTOR_CFG['type'] = 'FastCCNet'          # was 'CCNet'; every other key stays
    segmentor = BuildSegmentor(segmentor_cfg=SEGMENTOR_CFG, mode='TRAIN')

``Fast<X>`` is a subclass of ssseg's ``<X>`` segmentor: it builds exactly the original modules,
then swaps its context modules for fastctx's with :func:`fastctx.swap` (strict), so its
``state_dict`` is the original's and it computes the same logits. An optional
``cfg['fastctx_backend']`` names the backend of the fastctx ops.

Segmentors:

- ``FastCCNet`` (CCNet: ``cca``, mmcv's CrissCrossAttention -> :class:`fastctx.nn.CrissCrossAttention`);
- ``FastISNet`` (ISNet: ``ilc_net`` -> :class:`fastctx.nn.ImageLevelContext`, ``slc_net`` ->
  :class:`fastctx.nn.SemanticLevelContext`);
- ``FastOCRNet`` (OCRNet: ``spatial_gather_module`` -> :class:`fastctx.nn.SpatialGather`,
  ``object_context_block`` -> :class:`fastctx.nn.ObjectAttention`; ``head.scale`` 1, as
  sssegmentation's own forward fails for more);
- ``FastISANet`` (ISANet: ``global_relation`` / ``local_relation`` ->
  :class:`fastctx.nn.interlaced.ISASelfAttentionBlock`, and its padding/permute forward -> the
  fused interlaced attention);
- ``FastANNNet`` (ANNNet: ``afn_block`` / ``apn_block`` -> :class:`fastctx.nn.AFNB` /
  :class:`fastctx.nn.APNB`).

Adding one is a line, once :mod:`fastctx.swap` recognises its modules::

    FastXNet = fast_segmentor(XNet, "FastXNet", swaps=(...))
"""

from __future__ import annotations

from torch import nn

from fastctx.integrations import require
from fastctx.swap import swap

_PLUGIN = "fastctx.integrations.sssegmentation"
require("ssseg.modules.models.segmentors.builder", _PLUGIN, "sssegmentation")

from ssseg.modules.models.segmentors.builder import SegmentorBuilder  # noqa: E402
from ssseg.modules.models.segmentors.ccnet import CCNet  # noqa: E402
from ssseg.modules.models.segmentors.isnet import ISNet  # noqa: E402
from ssseg.modules.models.segmentors.ocrnet import OCRNet  # noqa: E402

__all__ = ["FastANNNet", "FastCCNet", "FastISANet", "FastISNet", "FastOCRNet", "fast_segmentor"]


def fast_segmentor(base: type[nn.Module], name: str, swaps: tuple[str, ...]) -> type[nn.Module]:
    """Make ``name``, a subclass of the ssseg segmentor ``base`` whose submodules at the paths
    ``swaps`` are swapped for fastctx's when it is built, and register it in
    ``SegmentorBuilder.REGISTERED_MODULES``.

    Args:
        base (type): the ssseg segmentor class (e.g. ``CCNet``).
        name (str): the registered type name (e.g. ``"FastCCNet"``).
        swaps (tuple[str, ...]): submodule paths that must be swapped; building fails with a
            RuntimeError when one is not.
    """

    class FastSegmentor(base):
        def __init__(self, cfg: dict, mode: str) -> None:
            base.__init__(self, cfg, mode)
            _, report = swap(self, backend=cfg.get("fastctx_backend"), strict=True)
            missing = sorted(set(swaps) - {e.path for e in report.swapped})
            if missing:
                raise RuntimeError(f"{_PLUGIN}.{name}: {missing} not swapped\n{report}")

    FastSegmentor.__name__ = FastSegmentor.__qualname__ = name
    FastSegmentor.__module__ = __name__
    FastSegmentor.__doc__ = (
        f"sssegmentation's {base.__name__} on fastctx ops: same config, same state_dict, same "
        f"logits; swapped: {', '.join(swaps)}."
    )
    SegmentorBuilder.REGISTERED_MODULES[name] = FastSegmentor
    return FastSegmentor


FastCCNet = fast_segmentor(CCNet, "FastCCNet", swaps=("cca",))
FastISNet = fast_segmentor(ISNet, "FastISNet", swaps=("ilc_net", "slc_net"))
FastOCRNet = fast_segmentor(OCRNet, "FastOCRNet", swaps=("spatial_gather_module", "object_context_block"))


# sssegmentation ISANet / ANNNet ------------------------------------------------------------------

from ssseg.modules.models.segmentors.annnet import ANNNet  # noqa: E402
from ssseg.modules.models.segmentors.isanet import ISANet  # noqa: E402

from fastctx.swap import fast_isanet_class  # noqa: E402

# The relations are swapped by fastctx.swap; the forward without the permuted copies comes from
# the base, fastctx.swap.fast_isanet_class(ISANet) (what swap() makes of an ISANet).
FastISANet = fast_segmentor(fast_isanet_class(ISANet), "FastISANet", swaps=("global_relation", "local_relation"))
FastISANet.__doc__ = (
    "sssegmentation's ISANet on fastctx ops: same config, same state_dict, same logits; swapped: "
    "global_relation, local_relation, and the padding/permute forward (fused interlaced attention)."
)
FastANNNet = fast_segmentor(ANNNet, "FastANNNet", swaps=("afn_block", "apn_block"))
