"""Pure-PyTorch references ("the truth") for every fastctx operator.

Readable einsum / matmul code; the exact semantics are in ``docs/OPERATORS.md``. Tests and
benchmarks import these; never copy one into a test file. float16 / bfloat16 inputs are computed
in float32 and returned in the input dtype; float32 / float64 compute in their own dtype. Inputs
are not validated beyond what the computation needs.
"""

from .criss_cross import criss_cross_attention
from .interlaced import interlaced_attention
from .ocr import region_attention, spatial_gather
from .pyramid import pyramid_attention, pyramid_pool
from .semantic import semantic_pool, semantic_pool_regions

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
