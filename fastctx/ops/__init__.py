"""The functional ops, one module per operator (see CONTRIBUTING.md)."""

from fastctx.ops.criss_cross import criss_cross_attention
from fastctx.ops.interlaced import interlaced_attention
from fastctx.ops.ocr import region_attention, spatial_gather
from fastctx.ops.pyramid import pyramid_attention, pyramid_pool
from fastctx.ops.semantic import semantic_pool, semantic_pool_regions

__all__ = [
    "criss_cross_attention",
    "interlaced_attention",
    "pyramid_pool",
    "pyramid_attention",
    "spatial_gather",
    "region_attention",
    "semantic_pool",
    "semantic_pool_regions",
]
