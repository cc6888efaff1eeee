"""Test support: import the real segmentation toolboxes as ``make install`` installs them.

fastctx never imports this file, nor the toolboxes (``tests/test_integrations_mmseg.py`` proves
it). The toolboxes are test-only dependencies, pinned in the Makefile: mmsegmentation 1.2.2 +
mmcv-lite 2.1.0 + mmengine 0.10.7 (+ ftfy, regex), sssegmentation 1.7.0 (``--no-deps``, + dill,
tqdm, torchvision). A test that needs one calls :func:`mmseg` or :func:`ssseg_segmentor`; when the
toolbox is missing the test FAILS (CI installs it), with the install command in the message.

Two workarounds for how they are installed, kept here and nowhere else:

1. **mmcv._ext.** mmcv-lite ships no compiled ``mmcv._ext``, yet ``import mmseg.models``
   reaches ``from mmcv.ops import point_sample``, and importing ``mmcv.ops`` loads every
   compiled op's symbols (``mmcv.utils.ext_loader.load_ext`` asserts each name exists in
   ``mmcv._ext``). :func:`mmseg` first puts a stand-in ``mmcv._ext`` in ``sys.modules`` whose
   every attribute is a function that raises ``RuntimeError`` when called: the pure-PyTorch mmcv
   modules (``CrissCrossAttention``, ``ConvModule``, ``Scale``) work, and a test that reached a
   compiled op would fail loudly instead of computing something else.
2. **ssseg.modules.** ``ssseg/modules/__init__.py`` imports the data sets (pandas, ...),
   the parallel wrappers and every model. :func:`ssseg_segmentor` registers the packages
   ``ssseg.modules``, ``ssseg.modules.models`` and ``ssseg.modules.models.segmentors`` as bare
   packages (their real ``__path__``, without running their ``__init__``), then imports only
   the segmentor package asked for; its real imports (backbones, losses, utils: dill, tqdm) run
   unchanged. ``ssseg.modules.models.segmentors.builder`` (the registry, which imports every
   segmentor; the SAM ones need torchvision) imports the same way.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

_INSTALL = "run `make install` (it installs the test-only toolboxes into .venv; see the Makefile)"

_SSSEG_BARE_PACKAGES = ("ssseg.modules", "ssseg.modules.models", "ssseg.modules.models.segmentors")


def _require(module: str, what: str) -> types.ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"tests need {what} ({e}): {_INSTALL}") from e


def _stand_in_mmcv_ext() -> None:
    if "mmcv._ext" in sys.modules:
        return
    ext = types.ModuleType("mmcv._ext", "stand-in for mmcv-lite's missing compiled ops (tests/toolboxes.py)")

    def __getattr__(name: str):  # noqa: N807 (PEP 562 module __getattr__)
        if name.startswith("__"):
            raise AttributeError(name)

        def compiled_op(*args, **kwargs):
            raise RuntimeError(f"mmcv._ext.{name}: a compiled mmcv op, absent from mmcv-lite (tests/toolboxes.py)")

        compiled_op.__name__ = name
        return compiled_op

    ext.__getattr__ = __getattr__
    sys.modules["mmcv._ext"] = ext


def mmseg() -> types.ModuleType:
    """Import ``mmseg.models`` (registers every mmseg model) and return ``mmseg``."""
    _require("mmcv", "mmcv-lite 2.1.0")
    _stand_in_mmcv_ext()
    _require("mmseg.models", "mmsegmentation 1.2.2")
    return sys.modules["mmseg"]


def ssseg_segmentor(name: str) -> types.ModuleType:
    """Import ``ssseg.modules.models.segmentors.<name>`` (e.g. ``"ccnet"``, ``"builder"``)
    without running ``ssseg/modules/__init__.py``; return that module."""
    _require("mmcv", "mmcv-lite 2.1.0 (sssegmentation's CCNet takes mmcv's CrissCrossAttention)")
    _stand_in_mmcv_ext()
    ssseg = _require("ssseg", "sssegmentation 1.7.0")
    root = os.path.dirname(ssseg.__file__)
    for pkg in _SSSEG_BARE_PACKAGES:
        if pkg not in sys.modules:
            bare = types.ModuleType(pkg, "bare package: __init__ not run (tests/toolboxes.py)")
            bare.__path__ = [os.path.join(root, *pkg.split(".")[1:])]
            bare.__package__ = pkg
            sys.modules[pkg] = bare
            parent, _, child = pkg.rpartition(".")
            setattr(sys.modules[parent], child, bare)
    return _require(f"ssseg.modules.models.segmentors.{name}", "sssegmentation 1.7.0 and its imports")


# ---------------------------------------------------------------------------------------------
# Model helpers shared by the swap and integration tests
# ---------------------------------------------------------------------------------------------


def randomize(model, gamma: float = 0.8) -> None:
    """Non-trivial weights: random BN affine and running statistics, and every criss-cross
    ``gamma`` set to ``gamma`` (mmcv starts it at 0, where the attention would not reach the
    output and no comparison could fail)."""
    import torch
    from torch import nn

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
            if hasattr(m, "gamma") and hasattr(m.gamma, "scale"):
                m.gamma.scale.fill_(gamma)


def ssseg_ccnet_cfg(type_: str, in_channels: int, feats_channels: int) -> dict:
    """sssegmentation's CCNet config for Cityscapes (configs/ccnet/ccnet_resnet50os8_cityscapes.py:
    19 classes, SyncBatchNorm, ReLU, 2 recurrences, dropout 0.1), without backbone and auxiliary
    head: the tests feed the feature map through :func:`ssseg_given_features`."""
    return {
        "type": type_, "num_classes": 19, "align_corners": False,
        "norm_cfg": {"type": "SyncBatchNorm"}, "act_cfg": {"type": "ReLU", "inplace": True},
        "head": {"in_channels": in_channels, "feats_channels": feats_channels, "num_recurrence": 2,
                 "dropout": 0.1},
        "auxiliary": None,
    }


def ssseg_given_features(segmentor) -> None:
    """Give an ssseg segmentor built without backbone a stand-in one: its input IS the feature
    map (``selected_indices=(0,)``), so its real ``forward`` runs from the features on."""
    from torch import nn

    class GivenFeatures(nn.Module):
        def forward(self, x):
            return [x]

    segmentor.cfg["backbone"] = {"selected_indices": (0,)}
    segmentor.backbone_net = GivenFeatures()


def ssseg_logits(segmentor):
    """``x -> seg_logits`` through the segmentor's own forward. In ``TEST`` mode it returns the
    logits; after ``.train()`` the BN statistics and dropout still train (ssseg's TRAIN mode would
    return only the loss)."""
    from ssseg.modules.utils import SSSegInputStructure

    def forward(x):
        segmentor.mode = "TEST"
        return segmentor(SSSegInputStructure(images=x, mode="TEST")).seg_logits

    return forward


# ---- sssegmentation ISNet / OCRNet (tests/test_swap_ssseg_isnet_ocr.py) -----------------------


def ssseg_isnet_cfg(type_: str, in_channels: int, feats_channels: int, transform_channels: int) -> dict:
    """sssegmentation's ISNet config for Cityscapes (configs/isnet/base_cfg.py +
    isnet_resnet50os8_cityscapes.py: 19 classes, SyncBatchNorm, ReLU, concat_input, no shortcut,
    dropout 0.1; head in 2048, feats 512, transform 256), without backbone and auxiliary head:
    the tests feed the feature map through :func:`ssseg_given_features`."""
    return {
        "type": type_, "num_classes": 19, "align_corners": False,
        "norm_cfg": {"type": "SyncBatchNorm"}, "act_cfg": {"type": "ReLU", "inplace": True},
        "head": {"in_channels": in_channels, "feats_channels": feats_channels,
                 "transform_channels": transform_channels, "concat_input": True,
                 "shortcut": {"is_on": False, "in_channels": 256, "feats_channels": 48}, "dropout": 0.1},
        "auxiliary": None,
    }


def ssseg_ocrnet_cfg(type_: str, aux_in: int, aux_out: int, in_channels: int, feats_channels: int,
                     transform_channels: int) -> dict:
    """sssegmentation's OCRNet config for Cityscapes (configs/ocrnet/ocrnet_resnet50os8_cityscapes.py:
    19 classes, SyncBatchNorm, ReLU, scale 1, dropout 0; head in 2048, feats 512, transform 256;
    auxiliary in 1024, out 512, which OCRNet requires), without backbone: the tests feed
    ``cat([stage 3, stage 4])`` through :func:`ssseg_given_split_features`."""
    return {
        "type": type_, "num_classes": 19, "align_corners": False,
        "norm_cfg": {"type": "SyncBatchNorm"}, "act_cfg": {"type": "ReLU", "inplace": True},
        "head": {"in_channels": in_channels, "feats_channels": feats_channels,
                 "transform_channels": transform_channels, "scale": 1, "dropout": 0},
        "auxiliary": {"in_channels": aux_in, "out_channels": aux_out, "dropout": 0},
    }


def ssseg_given_split_features(segmentor, *channels: int) -> None:
    """As :func:`ssseg_given_features`, for segmentors that read several backbone stages (OCRNet:
    ``[-2]`` for the auxiliary head, ``[-1]`` for the head): the input is the stages' feature
    maps concatenated along the channels, split back into ``channels``."""
    from torch import nn

    class GivenSplitFeatures(nn.Module):
        def forward(self, x):
            return list(x.split(list(channels), dim=1))

    segmentor.cfg["backbone"] = {"selected_indices": tuple(range(len(channels)))}
    segmentor.backbone_net = GivenSplitFeatures()


# ---------------------------------------------------------------------------------------------
# sssegmentation ISANet / ANNNet (tests/test_swap_ssseg_isa_ann.py)
# ---------------------------------------------------------------------------------------------

#: sssegmentation's CrossEntropyLoss as its configs use it (``SEGMENTOR_CFG['losses']``).
SSSEG_LOSSES = {"loss_cls": {"type": "CrossEntropyLoss", "scale_factor": 1.0, "ignore_index": 255,
                             "reduction": "mean"}}


def ssseg_isanet_cfg(type_: str, in_channels: int, feats_channels: int, isa_channels: int,
                     down_factor: tuple[int, int] = (8, 8)) -> dict:
    """sssegmentation's ISANet config for Cityscapes (configs/isanet/isanet_resnet50os8_cityscapes.py
    and base_cfg.py: 19 classes, SyncBatchNorm, ReLU, ``down_factor=(8, 8)``, dropout 0.1; widths
    2048 / 512 / 256, given here narrowed), without backbone and auxiliary head: the tests feed the
    feature map through :func:`ssseg_given_features`."""
    return {
        "type": type_, "num_classes": 19, "align_corners": False,
        "norm_cfg": {"type": "SyncBatchNorm"}, "act_cfg": {"type": "ReLU", "inplace": True},
        "head": {"down_factor": tuple(down_factor), "in_channels": in_channels,
                 "feats_channels": feats_channels, "isa_channels": isa_channels, "dropout": 0.1},
        "auxiliary": None, "losses": dict(SSSEG_LOSSES),
    }


def ssseg_annnet_cfg(type_: str, in_channels_list: tuple[int, int], transform_channels: int,
                     feats_channels: int, query_scales: tuple[int, ...] = (1,),
                     key_pool_scales: tuple[int, ...] = (1, 3, 6, 8)) -> dict:
    """sssegmentation's ANNNet config for Cityscapes (configs/annnet/annnet_resnet50os8_cityscapes.py
    and base_cfg.py: 19 classes, SyncBatchNorm, ReLU, ``query_scales=(1,)``,
    ``key_pool_scales=(1, 3, 6, 8)``, dropout 0.1; widths [1024, 2048] / 256 / 512, given here
    narrowed), without backbone and auxiliary head: the tests feed the two feature maps through
    :func:`ssseg_given_split_features`."""
    return {
        "type": type_, "num_classes": 19, "align_corners": False,
        "norm_cfg": {"type": "SyncBatchNorm"}, "act_cfg": {"type": "ReLU", "inplace": True},
        "head": {"in_channels_list": list(in_channels_list), "transform_channels": transform_channels,
                 "query_scales": tuple(query_scales), "feats_channels": feats_channels,
                 "key_pool_scales": tuple(key_pool_scales), "dropout": 0.1},
        "auxiliary": None, "losses": dict(SSSEG_LOSSES),
    }

