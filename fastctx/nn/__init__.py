"""Drop-in modules built on the fused ops."""

from fastctx.nn.ann import AFNB, APNB, PyramidSelfAttentionBlock
from fastctx.nn.criss_cross import RCCA, CrissCrossAttention, Scale
from fastctx.nn._conv import ConvModule
from fastctx.nn.interlaced import InterlacedSparseAttention, ISASelfAttentionBlock

__all__ = [
    "AFNB",
    "APNB",
    "ConvModule",
    "CrissCrossAttention",
    "ISASelfAttentionBlock",
    "InterlacedSparseAttention",
    "PyramidSelfAttentionBlock",
    "RCCA",
    "Scale",
]
