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
from tests._utils import assert_close
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
    assert list(fast.state_dict()) == list(original.state_dict())
    fast.load_state_dict(original.state_dict(), strict=True)
    original.eval()
    fast.eval()
    x = [torch.randn(2, 32, 13, 11)] * 4
    with torch.no_grad():
        want, got = original(x), fast(x)
    assert fastctx.last_backend("criss_cross_attention") == "reference"
    assert_close(got, want.double(), torch.float32, "logits")


def test_fastcchead_that_cannot_swap_fails_to_build(mmseg):
    from mmseg.registry import MODELS

    with pytest.raises(SwapError, match="4 channels: fastctx.nn.CrissCrossAttention needs at least 8"):
        MODELS.build(cchead_cfg(type="FastCCHead", channels=4))


def test_config_with_the_plugin_loads_the_original_checkpoint(mmseg, tmp_path):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint
    from mmseg.registry import MODELS

    base = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", "ccnet",
                        "ccnet_r50-d8_4xb2-40k_cityscapes-512x1024.py")
    original_cfg = Config.fromfile(base)
    original_cfg.model.pretrained = None  # random weights: nothing to download
    # Forget the plugin, so that what registers FastCCHead below is the config's custom_imports.
    sys.modules.pop("fastctx.integrations.mmseg")
    MODELS._module_dict.pop("FastCCHead")
    user_cfg = tmp_path / "ccnet_r50-d8_fastctx.py"
    user_cfg.write_text(
        f"_base_ = [{base!r}]\n"
        "custom_imports = dict(imports=['fastctx.integrations.mmseg'], allow_failed_imports=False)\n"
        "model = dict(pretrained=None, decode_head=dict(type='FastCCHead'))\n"
    )
    fast_cfg = Config.fromfile(str(user_cfg))
    assert "FastCCHead" in MODELS.module_dict
    assert fast_cfg.model.decode_head.channels == 512 and fast_cfg.model.decode_head.recurrence == 2

    init_default_scope(fast_cfg.get("default_scope", "mmseg"))  # as mmseg.apis.init_model does
    torch.manual_seed(0)
    original = MODELS.build(original_cfg.model)
    assert type(original.decode_head).__name__ == "CCHead"
    randomize(original)
    checkpoint = tmp_path / "ccnet_original.pth"
    torch.save({"meta": {}, "state_dict": original.state_dict()}, checkpoint)

    fast = MODELS.build(fast_cfg.model)
    assert type(fast.decode_head).__name__ == "FastCCHead"
    assert type(fast.decode_head.cca) is fastctx.nn.CrissCrossAttention
    load_checkpoint(fast, str(checkpoint), map_location="cpu", strict=True)
    original.eval()
    fast.eval()
    image = torch.randn(1, 3, 65, 97)  # a 9x13 feature map at output stride 8
    with torch.no_grad():
        want = original(image, mode="tensor")
        got = fast(image, mode="tensor")
        assert got.shape == (1, 19, 9, 13)
        assert_close(got, want.double(), torch.float32, "logits")
        # the criss-cross attention (gamma 0.8 in the checkpoint) matters to these logits
        fast.decode_head.cca.gamma.scale.zero_()
        without = fast(image, mode="tensor")
    assert float((without - want).abs().max()) > 1e-3 * float(want.abs().max())
