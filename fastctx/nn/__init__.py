"""Drop-in modules built on the fused ops."""

from fastctx.nn.criss_cross import RCCA, CrissCrossAttention, Scale

__all__ = ["RCCA", "CrissCrossAttention", "Scale"]
