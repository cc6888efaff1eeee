"""fastctx: fused kernels for the context-aggregation operators of semantic segmentation.

Functional API (NCHW tensors; each takes ``backend=None``, see :mod:`fastctx.backends`)::

    fastctx.criss_cross_attention(q, k, v, scale=1.0)
    fastctx.interlaced_attention(q, k, v, block=(8, 8), mode="long", scale=None)
    fastctx.pyramid_pool(x, pool_scales=(1, 3, 6, 8))
    fastctx.pyramid_attention(q, k, v, pool_scales=(1, 3, 6, 8), scale=None)
    fastctx.spatial_gather(feats, logits, scale=1.0)
    fastctx.region_attention(q, k, v, scale=None, bias=None)
    fastctx.semantic_pool(feats, logits)
    fastctx.semantic_pool_regions(feats, logits)

Modules live in :mod:`fastctx.nn`.
"""

from fastctx import models, nn
from fastctx._ext import ExtensionMissingError
from fastctx.backends import (
    BACKENDS,
    BackendUnavailableError,
    choose_backend,
    default_backend,
    explain,
    last_backend,
    use_backend,
)
from fastctx.ops import (
    criss_cross_attention,
    interlaced_attention,
    pyramid_attention,
    pyramid_pool,
    region_attention,
    semantic_pool,
    semantic_pool_regions,
    spatial_gather,
)
from fastctx.swap import SwapError, SwapReport, swap

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ExtensionMissingError",
    "choose_backend",
    "criss_cross_attention",
    "default_backend",
    "explain",
    "interlaced_attention",
    "last_backend",
    "models",
    "nn",
    "pyramid_attention",
    "pyramid_pool",
    "region_attention",
    "semantic_pool",
    "semantic_pool_regions",
    "spatial_gather",
    "swap",
    "SwapError",
    "SwapReport",
    "use_backend",
]
