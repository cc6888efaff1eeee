"""fastctx.integrations.mmseg: the mmsegmentation plugin, and toolbox isolation.

Needs mmsegmentation (installed by `make install`, imported through tests/toolboxes.py); the
tests FAIL when it is missing. The isolation tests run fresh interpreters.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastctx
from fastctx.swap import SwapError
from tests import toolboxes
from tests.swap_support import assert_plugin_head_matches, assert_same_logits, original_and_plugin_models, plugin_configs
from tests.toolboxes import randomize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLBOXES = ("mmseg", "mmcv", "mmengine", "ssseg", "torchvision")


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_toolbox_isolation_and_messages():
    """One fresh interpreter (each costs an import of torch): ``import fastctx`` and ``swap``
    import no toolbox; each plugin says what is wrong when its toolbox is missing or broken."""
    code = f"""
import importlib, sys, torch, fastctx, fastctx.integrations
from fastctx.swap import swap
swap(torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), fastctx.nn.CrissCrossAttention(8)))
print(sorted(m for m in sys.modules if m.split('.')[0] in {TOOLBOXES!r}))

def attempt(plugin):
    try:
        importlib.import_module('fastctx.integrations.' + plugin)
    except ImportError as e:
        print(e)

attempt('mmseg')  # mmcv-lite as installed, without tests/toolboxes.py's stand-in mmcv._ext
sys.modules['ssseg'] = None  # as if not installed
attempt('sssegmentation')
for name in [m for m in sys.modules if m == 'mmseg' or m.startswith('mmseg.')]:
    del sys.modules[name]
sys.modules['mmseg'] = None
attempt('mmseg')
"""
    res = python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "[]",
        "fastctx.integrations.mmseg needs mmsegmentation: it is installed but `import mmseg.models` "
        "failed: No module named 'mmcv._ext'",
        "fastctx.integrations.sssegmentation needs sssegmentation, which is not installed "
        "(`pip install sssegmentation`)",
        "fastctx.integrations.mmseg needs mmsegmentation, which is not installed (`pip install mmsegmentation`)",
    ], res.stdout


@pytest.fixture(scope="module")
def mmseg():
    mmseg = toolboxes.mmseg()
    import fastctx.integrations.mmseg  # noqa: F401 (registers the heads)

    return mmseg


def cchead_cfg(**overrides) -> dict:
    cfg = dict(  # mmseg configs/_base_/models/ccnet_r50-d8.py decode_head, narrowed, BN
        type="CCHead", in_channels=32, in_index=3, channels=16, recurrence=2, dropout_ratio=0.1,
        num_classes=19, norm_cfg=dict(type="BN", requires_grad=True), align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    )
    cfg.update(overrides)
    return cfg


def test_fastcchead_takes_cchead_keys_and_state(mmseg):
    from mmseg.models.decode_heads import CCHead
    from mmseg.registry import MODELS

    original = MODELS.build(cchead_cfg())
    randomize(original)
    fast = MODELS.build(cchead_cfg(type="FastCCHead", fastctx_backend="reference"))
    assert isinstance(fast, CCHead) and type(fast).__name__ == "FastCCHead"
    assert type(fast.cca) is fastctx.nn.CrissCrossAttention and fast.cca.backend == "reference"
    assert_plugin_head_matches(original, fast, ([torch.randn(2, 32, 13, 11)] * 4,), "criss_cross_attention")


def test_fastcchead_that_cannot_swap_fails_to_build(mmseg):
    from mmseg.registry import MODELS

    with pytest.raises(SwapError, match="4 channels: fastctx.nn.CrissCrossAttention needs at least 8"):
        MODELS.build(cchead_cfg(type="FastCCHead", channels=4))


def test_config_with_the_plugin_loads_the_original_checkpoint(mmseg, tmp_path):
    original_cfg, fast_cfg = plugin_configs(mmseg, tmp_path, "ccnet/ccnet_r50-d8_4xb2-40k_cityscapes-512x1024.py",
                                            "FastCCHead", dict(type="FastCCHead"))
    assert fast_cfg.model.decode_head.channels == 512 and fast_cfg.model.decode_head.recurrence == 2
    original, fast = original_and_plugin_models(original_cfg, fast_cfg, tmp_path, randomize)
    assert type(original.decode_head).__name__ == "CCHead"
    assert type(fast.decode_head).__name__ == "FastCCHead"
    assert type(fast.decode_head.cca) is fastctx.nn.CrissCrossAttention
    image = torch.randn(1, 3, 65, 97)  # a 9x13 feature map at output stride 8
    # the criss-cross attention (gamma 0.8 in the checkpoint) matters to these logits
    assert_same_logits(original, fast, image, (1, 19, 9, 13), [fast.decode_head.cca.gamma.scale])
