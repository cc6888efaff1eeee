"""fastctx.integrations.sssegmentation: FastCCNet in ssseg's SegmentorBuilder.

Needs sssegmentation (installed by `make install`, imported through tests/toolboxes.py, whose
docstring says why its registry needs torchvision); the tests FAIL when it is missing.
"""

from __future__ import annotations

import pytest
import torch

import fastctx
from fastctx.swap import SwapError
from tests import toolboxes
from tests._utils import assert_close
from tests.toolboxes import randomize


@pytest.fixture(scope="module")
def builder():
    builder = toolboxes.ssseg_segmentor("builder")
    import fastctx.integrations.sssegmentation  # noqa: F401 (registers FastCCNet)

    return builder


def test_fastccnet_builds_from_the_ccnet_config(builder):
    from ssseg.modules.models.segmentors.ccnet import CCNet

    assert "FastCCNet" in builder.SegmentorBuilder.REGISTERED_MODULES
    torch.manual_seed(0)
    original = builder.BuildSegmentor(segmentor_cfg=toolboxes.ssseg_ccnet_cfg("CCNet", 32, 16), mode="TEST")
    cfg = toolboxes.ssseg_ccnet_cfg("FastCCNet", 32, 16)
    cfg["fastctx_backend"] = "reference"
    fast = builder.BuildSegmentor(segmentor_cfg=cfg, mode="TEST")
    assert isinstance(fast, CCNet) and type(fast).__name__ == "FastCCNet"
    assert type(fast.cca) is fastctx.nn.CrissCrossAttention and fast.cca.backend == "reference"
    randomize(original)
    assert list(fast.state_dict()) == list(original.state_dict())
    fast.load_state_dict(original.state_dict(), strict=True)
    for segmentor in (original, fast):
        toolboxes.ssseg_given_features(segmentor)
        segmentor.eval()
    x = torch.randn(2, 32, 11, 14)
    with torch.no_grad():
        want, got = toolboxes.ssseg_logits(original)(x), toolboxes.ssseg_logits(fast)(x)
    assert fastctx.last_backend("criss_cross_attention") == "reference"
    assert_close(got, want.double(), torch.float32, "logits")


def test_fastccnet_that_cannot_swap_fails_to_build(builder):
    with pytest.raises(SwapError, match="4 channels: fastctx.nn.CrissCrossAttention needs at least 8"):
        builder.BuildSegmentor(segmentor_cfg=toolboxes.ssseg_ccnet_cfg("FastCCNet", 32, 4), mode="TEST")
