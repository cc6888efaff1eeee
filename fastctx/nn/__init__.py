"""Drop-in modules built on the fused ops."""

from fastctx.nn.ann import AFNB, APNB, PyramidSelfAttentionBlock
from fastctx.nn.criss_cross import RCCA, CrissCrossAttention, Scale
from fastctx.nn._conv import ConvModule
from fastctx.nn.interlaced import InterlacedSparseAttention, ISASelfAttentionBlock
from fastctx.nn.isnet import ImageLevelContext, SemanticLevelContext
from fastctx.nn.ocr import ObjectAttention, SpatialGather

__all__ = [
    "AFNB",
    "APNB",
    "ConvModule",
    "CrissCrossAttention",
    "ISASelfAttentionBlock",
    "ImageLevelContext",
    "InterlacedSparseAttention",
    "ObjectAttention",
    "PyramidSelfAttentionBlock",
    "RCCA",
    "Scale",
    "SemanticLevelContext",
    "SpatialGather",
]
