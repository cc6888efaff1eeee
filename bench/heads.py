"""The segmentation toolboxes' heads before and after ``fastctx.swap``: time, peak memory, parity.

    .venv/bin/python bench/heads.py [--quick] [--out DIR]
        [--heads mmseg-CCHead,ssseg-ISNet,...] [--size BxHxW] [--narrow N] [--device cpu|cuda]

writes ``DIR/report.{md,json,csv}`` (default DIR: ./fastctx-heads-report) in the format of
``fastctx bench`` (fastctx/bench/runner.py runs the cases, fastctx/bench/report.py writes them) and
prints the Markdown. Exit status 1 when a candidate fails its parity check or errors, 2 when a
toolbox is missing.

Each case is one head of mmsegmentation 1.2.2 or sssegmentation 1.7.0, built with the toolbox's own
Cityscapes config values (BN for one process in mmseg; ssseg's SyncBatchNorm, which runs as BN in
one process), random non-trivial weights (:func:`tests.toolboxes.randomize`, and every parameter
the toolbox starts at zero drawn from N(0, 0.1), so that every branch reaches the logits). Two
candidates, in the same run:

* ``original``: the head as the toolbox builds it;
* ``swapped``: a ``copy.deepcopy`` of it after ``fastctx.swap(strict=True)``. When the swap
  recognised nothing (a head whose recogniser this fastctx does not have yet) the candidate is
  reported ``skipped: nothing swapped``: an unswapped copy is never timed as "swapped". A swap
  that raises (strict) is reported as the candidate's error.

What is timed, in training mode (BN on batch statistics, as a training step; dropout off, so that
both candidates compute the same numbers): the feature maps AND every parameter are the case's
inputs (the head runs through ``torch.func.functional_call``), so "bwd" computes the gradient of
the input features and of every parameter. The output is the logits a training step takes from the
head (OCR: the FCN auxiliary's and the OCR head's, concatenated; ssseg: the segmentor's
``seg_logits``, its own forward with the backbone replaced by the given feature maps, as
tests/toolboxes.py's ``ssseg_given_features`` does). fp32; peak memory as fastctx.bench.measure
measures it.

A second case per head, ``<head case>-swapped-modules``, times only the modules the swap replaced
(every call the head makes to one of them, on the inputs the original head gives it there), the
original modules against the swapped ones. The rest of a head is the same code in both
candidates, so this is the part of the head's time the swap changes; at full size it takes
milliseconds where the head takes seconds, and the head's own ratio is within its convolutions'
noise when the replaced modules are a small part of it (the OCR heads). Where the swap replaces
the whole head (sssegmentation's ISANet segmentor) the case is reported skipped: the head case is
that measurement.

Parity: each candidate's logits against the original head run in float64 (same weights), within
the float32 row of fastctx.testing widened 10x as for the model cases (``out_rel_err`` in the
JSON/CSV and the Markdown: max |diff| / max |truth|).
The gradients are computed, not compared: float32 rounding in a whole head in training mode
(ReLUs whose input rounds across 0) moves a few gradient elements of the original as much as of
the swapped head; tests/test_swap*.py compare every gradient in float64 (relative error 1e-5).

Sizes: B=2, the ResNet heads' 1/8 of 512x1024 = 64x128 at the Cityscapes widths (in_channels
2048, channels 512, ...). ``--quick``: 33x65 feature maps (1/8 of 257x513: ISA pads them), every
width divided by 8 (``--narrow 8``) and fewer repetitions: the heads' 3x3 convolutions, which the
swap does not touch, cost ~0.8 TFLOP a forward at full width and size (CCHead). Narrowing makes
the attention (linear in the width) a larger part of a head than its convolutions (quadratic):
the quick ratios flatter the swap; the full-size run gives the figures. ``--size`` and
``--narrow`` override either.

Targets, checked on CPU in fp32 (the issue's): every swapped head at least as fast as the original
(fwd and fwd+bwd; the ISNet head at least 10x) and no swapped head above the original's peak
memory (fwd and fwd+bwd); and ours: the replaced modules, swapped, at least as fast as the
originals (fwd and fwd+bwd).

The toolboxes are not fastctx dependencies: they are imported through tests/toolboxes.py (which
holds the stand-in ``mmcv._ext`` that importing mmseg needs); ``make test`` installs them.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's fastctx and tests/ (mmseg's wheel may ship a `tests`)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from fastctx.bench import markdown, run, write  # noqa: E402
from fastctx.bench.cases import Case, Target  # noqa: E402
from fastctx.bench.measure import Skip  # noqa: E402
from fastctx.swap import swap  # noqa: E402

INSTALL = (
    "bench/heads.py needs the segmentation toolboxes, which are test-only (not fastctx dependencies): "
    "mmsegmentation==1.2.2 mmcv-lite==2.1.0 mmengine==0.10.7 ftfy regex, and sssegmentation==1.7.0 "
    "(pip --no-deps, with dill tqdm torchvision). `make test` installs them into .venv "
    "(`make .venv/.toolboxes` installs only them)."
)
NUM_CLASSES = 19
FULL = (2, 64, 128)  # B, H, W: 1/8 of 512x1024
QUICK = (2, 33, 65)
QUICK_NARROW = 8
SYNC_BN = {"type": "SyncBatchNorm"}  # sssegmentation's Cityscapes configs


# ---------------------------------------------------------------------------------------------
# the heads
# ---------------------------------------------------------------------------------------------


class Harness(nn.Module):
    """``x -> logits`` through ``model`` (the head, or the ssseg segmentor): ``run(model, x)``."""

    def __init__(self, model: nn.Module, run: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.run = run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(self.model, x)


class GivenStages(nn.Module):
    """An ssseg backbone stand-in for heads that read two stages: ``x = cat(stages)`` -> the
    stages (``selected_indices`` picks them all), so the segmentor's own forward runs from there."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x):
        return list(torch.split(x, self.channels, dim=1))


@dataclass
class Head:
    name: str  # toolbox-Head, e.g. "mmseg-CCHead"
    in_channels: Callable[[int], int]  # narrow -> channels of x (the stages it reads, concatenated)
    build: Callable[[int], Harness]  # narrow -> the head, not yet randomised
    speed_target: float = 1.0  # the swapped head is at least this many times faster (CPU, fp32)
    tol_scale: float = 10.0  # the float32 row widened this much for the logits' parity (HeadCase)
    config: Callable[[int], dict] = field(default=lambda n: {})


def _mmseg_build(cfg: dict):
    from mmseg.registry import MODELS

    return MODELS.build(cfg)


def _mmseg_cfg(**kw) -> dict:
    cfg = dict(dropout_ratio=0.1, num_classes=NUM_CLASSES, norm_cfg=dict(type="BN", requires_grad=True),
               align_corners=False, loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0))
    cfg.update(kw)
    return cfg


def mmseg_cchead(n: int) -> Harness:  # configs/_base_/models/ccnet_r50-d8.py
    head = _mmseg_build(_mmseg_cfg(type="CCHead", in_channels=2048 // n, in_index=3, channels=512 // n, recurrence=2))
    return Harness(head, lambda m, x: m([None, None, None, x]))


def mmseg_isahead(n: int) -> Harness:  # configs/_base_/models/isanet_r50-d8.py
    head = _mmseg_build(_mmseg_cfg(type="ISAHead", in_channels=2048 // n, in_index=3, channels=512 // n,
                                   isa_channels=256 // n, down_factor=(8, 8)))
    return Harness(head, lambda m, x: m([None, None, None, x]))


def mmseg_annhead(n: int) -> Harness:  # configs/_base_/models/ann_r50-d8.py
    low = 1024 // n
    head = _mmseg_build(_mmseg_cfg(type="ANNHead", in_channels=[low, 2048 // n], in_index=[2, 3], channels=512 // n,
                                   project_channels=256 // n, query_scales=(1,), key_pool_scales=(1, 3, 6, 8)))
    return Harness(head, lambda m, x: m([None, None, x[:, :low], x[:, low:]]))


def mmseg_ocr_cascade(n: int) -> Harness:  # configs/_base_/models/ocrnet_r50-d8.py
    low = 1024 // n
    aux = _mmseg_build(_mmseg_cfg(type="FCNHead", in_channels=low, in_index=2, channels=256 // n, num_convs=1,
                                  concat_input=False,
                                  loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4)))
    ocr = _mmseg_build(_mmseg_cfg(type="OCRHead", in_channels=2048 // n, in_index=3, channels=512 // n,
                                  ocr_channels=256 // n))

    def cascade(m, x):  # as mmseg's CascadeEncoderDecoder: the auxiliary's logits are the soft regions
        inputs = [None, None, x[:, :low], x[:, low:]]
        regions = m[0](inputs)
        return torch.cat([regions, m[1](inputs, regions)], dim=1)

    return Harness(nn.ModuleList([aux, ocr]), cascade)


def _ssseg(segmentor: str, cls: str, head: dict, auxiliary: dict | None = None, stages: tuple[int, ...] | None = None) -> Harness:
    from tests import toolboxes

    module = toolboxes.ssseg_segmentor(segmentor)
    cfg = {"type": cls, "num_classes": NUM_CLASSES, "align_corners": False, "norm_cfg": dict(SYNC_BN),
           "act_cfg": {"type": "ReLU", "inplace": True}, "head": head, "auxiliary": auxiliary}
    seg = getattr(module, cls)(cfg, mode="TEST")
    if stages is None:
        toolboxes.ssseg_given_features(seg)
    else:
        seg.cfg["backbone"] = {"selected_indices": tuple(range(len(stages)))}
        seg.backbone_net = GivenStages(stages)
    return Harness(seg, lambda m, x: toolboxes.ssseg_logits(m)(x))


def ssseg_ccnet(n: int) -> Harness:  # configs/ccnet/ccnet_resnet50os8_cityscapes.py
    from tests import toolboxes

    cfg = toolboxes.ssseg_ccnet_cfg("CCNet", 2048 // n, 512 // n)
    return _ssseg("ccnet", "CCNet", cfg["head"])


def ssseg_isnet(n: int) -> Harness:  # configs/isnet/isnet_resnet50os8_cityscapes.py (auxiliary: not the head)
    return _ssseg("isnet", "ISNet", {
        "in_channels": 2048 // n, "feats_channels": 512 // n, "transform_channels": 256 // n, "concat_input": True,
        "shortcut": {"is_on": False, "in_channels": 256 // n, "feats_channels": 48 // n}, "dropout": 0.1})


def ssseg_ocrnet(n: int) -> Harness:  # configs/ocrnet/ocrnet_resnet50os8_cityscapes.py (the auxiliary gives the regions)
    return _ssseg("ocrnet", "OCRNet",
                  {"in_channels": 2048 // n, "feats_channels": 512 // n, "transform_channels": 256 // n, "scale": 1, "dropout": 0},
                  auxiliary={"in_channels": 1024 // n, "out_channels": 512 // n, "dropout": 0},
                  stages=(1024 // n, 2048 // n))


def ssseg_isanet(n: int) -> Harness:  # configs/isanet/isanet_resnet50os8_cityscapes.py
    return _ssseg("isanet", "ISANet", {"down_factor": (8, 8), "in_channels": 2048 // n, "feats_channels": 512 // n,
                                       "isa_channels": 256 // n, "dropout": 0.1})


def ssseg_annnet(n: int) -> Harness:  # configs/annnet/annnet_resnet50os8_cityscapes.py
    return _ssseg("annnet", "ANNNet", {"in_channels_list": [1024 // n, 2048 // n], "transform_channels": 256 // n,
                                       "query_scales": (1,), "feats_channels": 512 // n, "key_pool_scales": (1, 3, 6, 8),
                                       "dropout": 0.1},
                  stages=(1024 // n, 2048 // n))


HEADS: dict[str, Head] = {h.name: h for h in [
    Head("mmseg-CCHead", lambda n: 2048 // n, mmseg_cchead,
         config=lambda n: dict(in_channels=2048 // n, channels=512 // n, recurrence=2)),
    Head("mmseg-ISAHead", lambda n: 2048 // n, mmseg_isahead,
         config=lambda n: dict(in_channels=2048 // n, channels=512 // n, isa_channels=256 // n, down_factor=(8, 8))),
    Head("mmseg-ANNHead", lambda n: 3072 // n, mmseg_annhead,
         config=lambda n: dict(in_channels=(1024 // n, 2048 // n), channels=512 // n, project_channels=256 // n,
                               query_scales=(1,), key_pool_scales=(1, 3, 6, 8))),
    Head("mmseg-OCRHead+FCNHead", lambda n: 3072 // n, mmseg_ocr_cascade,
         config=lambda n: dict(fcn=dict(in_channels=1024 // n, channels=256 // n),
                               ocr=dict(in_channels=2048 // n, channels=512 // n, ocr_channels=256 // n))),
    Head("ssseg-CCNet", lambda n: 2048 // n, ssseg_ccnet,
         config=lambda n: dict(in_channels=2048 // n, feats_channels=512 // n, num_recurrence=2)),
    # tol_scale 50: at full width (64x128, 2048 -> 512 channels) the ORIGINAL head's own float32
    # logits are 9.2e-4 (relative) off its float64 run (the swapped head's: 9.1e-4), past 10x the
    # float32 row for both (measured at e58afb6); the report's "rel. error" column shows both
    Head("ssseg-ISNet", lambda n: 2048 // n, ssseg_isnet, speed_target=10.0, tol_scale=50.0,
         config=lambda n: dict(in_channels=2048 // n, feats_channels=512 // n, transform_channels=256 // n,
                               concat_input=True, shortcut=False)),
    Head("ssseg-OCRNet", lambda n: 3072 // n, ssseg_ocrnet,
         config=lambda n: dict(in_channels=2048 // n, feats_channels=512 // n, transform_channels=256 // n,
                               auxiliary=dict(in_channels=1024 // n, out_channels=512 // n))),
    Head("ssseg-ISANet", lambda n: 2048 // n, ssseg_isanet,
         config=lambda n: dict(in_channels=2048 // n, feats_channels=512 // n, isa_channels=256 // n, down_factor=(8, 8))),
    Head("ssseg-ANNNet", lambda n: 3072 // n, ssseg_annnet,
         config=lambda n: dict(in_channels_list=(1024 // n, 2048 // n), feats_channels=512 // n,
                               transform_channels=256 // n, query_scales=(1,), key_pool_scales=(1, 3, 6, 8))),
]}


def randomize(model: nn.Module) -> None:
    """tests/toolboxes.py's random BN statistics and criss-cross gamma, and every parameter the
    toolbox starts at zero (ANN's out_project, ...) drawn from N(0, 0.1)."""
    from tests import toolboxes

    toolboxes.randomize(model)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------


@dataclass
class HeadCase(Case):
    """A Case whose runner parity check compares the output (the logits) only (module docstring)."""

    check_grads: bool = False
    # a whole head in float32 rounds further from its float64 self than one op does (measured,
    # --quick: the swapped OCR cascade 2 elements of 163020 at 1.9x the float32 row), so the row
    # is widened as the model cases widen it
    tol_scale: float = 10.0


def _train_mode(model: nn.Module) -> nn.Module:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return model


#: the modules of the case being run: building a case's modules drops the previous case's (one
#: head at a time in memory; the runner runs each case to the end before the next)
_LIVE: dict[str, dict] = {}


def head_cases(head: Head, size: tuple[int, int, int], narrow: int, backend: str | None = None) -> list[Case]:
    """Two cases of ``head`` on ``B x C x H x W`` features, each with ``original`` and ``swapped``
    candidates: the whole head, and the modules the swap replaced alone (:func:`_modules_case`).
    The modules are built (and swapped) when the first case runs."""
    B, H, W = size
    name = f"{head.name}-B{B}-{H}x{W}" + (f"-width/{narrow}" if narrow > 1 else "")
    config = dict(head=head.name, **head.config(narrow), num_classes=NUM_CLASSES, B=B, H=H, W=W, narrow=narrow,
                  step="train mode (BN batch statistics), dropout off; fwd+bwd: grads of the features and every parameter",
                  truth="the original head in float64", parity="logits only", swapped=None, swap_error=None)

    def state() -> dict:
        if name not in _LIVE:
            _LIVE.clear()
            _LIVE[name] = build()
        return _LIVE[name]

    def build() -> dict:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            original = head.build(narrow)
            randomize(original)
        _train_mode(original)
        names = [n for n, _ in original.named_parameters()]
        swapped, why_not = None, None
        try:
            swapped, report = swap(copy.deepcopy(original), backend=backend, strict=True)
        except Exception as e:  # noqa: BLE001 (strict: reported as the candidate's error)
            why_not, report = e, None
        flags = {n: m.training for n, m in original.named_modules()}
        if swapped is not None and any(flags.get(n, m.training) != m.training for n, m in swapped.named_modules()):
            raise RuntimeError(f"bench/heads.py: {head.name}: the swap changed a submodule's train/eval flag")
        if report is not None:
            config["swapped"] = [str(e) for e in report.swapped]
            if not report.swapped:
                swapped, why_not = None, Skip(
                    f"nothing swapped: fastctx.swap recognises no module of {head.name} in this fastctx "
                    f"({len(report.left_alone)} left alone, {len(report.look_alikes)} look-alikes)")
        if why_not is not None:
            config["swap_error"] = f"{type(why_not).__name__}: {why_not}"
        if swapped is not None and sorted(n for n, _ in swapped.named_parameters()) != sorted(names):
            raise RuntimeError(f"bench/heads.py: {head.name}: the swapped head's parameters differ from the original's")
        paths = [e.path for e in report.swapped] if swapped is not None else []
        return dict(original=original, swapped=swapped, why_not=why_not, names=names, copies={}, paths=paths)

    def model(which: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
        st = state()
        if which == "swapped" and st["swapped"] is None:
            raise st["why_not"]
        m = st[which]
        if dtype == torch.float32 and device.type == "cpu":  # as built
            return m
        key = (which, dtype, str(device))
        if key not in st["copies"]:
            st["copies"][key] = copy.deepcopy(m).to(device, dtype)
        return st["copies"][key]

    def candidate(which: str):
        def fn(x, *params):
            names = state()["names"]
            return functional_call(model(which, x.dtype, x.device), dict(zip(names, params, strict=True)), (x,))

        return fn

    cin = head.in_channels(narrow)

    def make(dtype: torch.dtype, device: torch.device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, cin, H, W, generator=g)
        return (x.to(device, dtype), *(p.detach().to(device, dtype) for p in state()["original"].parameters()))

    targets = []
    for mode in ("fwd", "fwd+bwd"):
        speed = "as fast as" if head.speed_target == 1 else f"{head.speed_target:g}x as fast as"
        targets += [
            Target(f"swapped {head.name} at least {speed} the original, {mode}", "swapped", "original", mode, "speed",
                   head.speed_target, "cpu", (torch.float32,)),
            Target(f"swapped {head.name} peak memory at most the original's, {mode}", "swapped", "original", mode,
                   "memory", 1.0, "cpu", (torch.float32,)),
        ]
    whole = _original_vs_swapped(name, config, make, candidate, targets, head.tol_scale)
    return [whole, _modules_case(name, config, state, model, make)]


def _original_vs_swapped(name: str, config: dict, make: Callable, candidate: Callable[[str], Callable],
                         targets: list[Target], tol_scale: float = 10.0) -> HeadCase:
    """A case of the ``original`` and ``swapped`` candidates, the original the reference and the truth."""
    cand = {"original": candidate("original"), "swapped": candidate("swapped")}
    return HeadCase(op="heads", name=name, config=config, make_inputs=make, truth=cand["original"], candidates=cand,
                    backends=(), reference="original", strongest="original", targets=targets, tol_scale=tol_scale)


def _modules_case(name: str, config: dict, state: Callable[[], dict], model: Callable, make_head_inputs: Callable) -> Case:
    """The modules ``fastctx.swap`` replaced in a head, alone: every call the head's forward makes
    to one of them, with the inputs it gets there (recorded once from the original head in float32
    on the case's features), the original modules against the swapped ones, in training mode as
    the head case. Everything else in a head is the same code in both candidates, so this is the
    part of the head's time the swap changes, measured without the rest's noise (a full-size head
    takes seconds a call on this CPU and its convolutions vary by several percent between calls;
    the replaced modules take milliseconds)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    pconfig = dict(config, step=config["step"] + "; only the replaced modules, on the inputs the head gives them",
                   truth="the original modules in float64", parity="the modules' outputs only")

    def record() -> dict:
        """calls: (path, treespec of (args, kwargs), leaves with the floating tensors as slot
        numbers); inputs: the floating tensors (one slot for a tensor passed twice, e.g. ISA's
        query and key); params: the names of the replaced modules' parameters."""
        st = state()
        pconfig["swapped"] = config["swapped"]
        if "calls" in st:
            return st
        if not st["paths"]:
            raise Skip(f"nothing swapped: {st['why_not']}")
        if "model" in st["paths"]:
            raise Skip("the swap replaced the whole head (model): the head case is this measurement")
        original = copy.deepcopy(st["original"])  # recording runs a training-mode forward: BN statistics move
        calls, inputs, slot_of = [], [], {}

        def hook(path):
            def pre(module, args, kwargs):
                leaves, spec = tree_flatten((args, kwargs))
                for i, t in enumerate(leaves):
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        if id(t) not in slot_of:
                            slot_of[id(t)] = len(inputs)
                            inputs.append(t.detach().clone())
                        leaves[i] = slot_of[id(t)]
                    elif isinstance(t, torch.Tensor):
                        leaves[i] = ("const", t.detach().clone())
                calls.append((path, spec, leaves))
            return pre

        handles = [original.get_submodule(p).register_forward_pre_hook(hook(p), with_kwargs=True) for p in st["paths"]]
        try:
            with torch.no_grad():
                original(make_head_inputs(torch.float32, torch.device("cpu"))[0])
        finally:
            for h in handles:
                h.remove()
        if not calls:
            raise Skip(f"the head called none of the replaced modules ({', '.join(st['paths'])}) through its forward")
        prefixes = tuple(p + "." for p in st["paths"])
        st.update(calls=calls, inputs=inputs, params=[n for n in st["names"] if n.startswith(prefixes)])
        pconfig["calls"] = [c[0] for c in calls]
        return st

    def make(dtype: torch.dtype, device: torch.device):
        st = record()
        params = dict(st["original"].named_parameters())
        return (*(t.to(device, dtype) for t in st["inputs"]), *(params[n].detach().to(device, dtype) for n in st["params"]))

    def candidate(which: str):
        def fn(*args):
            st = record()
            n_in = len(st["inputs"])
            xs, params = args[:n_in], dict(zip(st["params"], args[n_in:], strict=True))
            m = model(which, xs[0].dtype, xs[0].device)
            outs = []
            for path, spec, leaves in st["calls"]:
                filled = [xs[x] if isinstance(x, int) else (x[1].to(xs[0].device) if isinstance(x, tuple) else x) for x in leaves]
                a, kw = tree_unflatten(filled, spec)
                own = {n[len(path) + 1:]: p for n, p in params.items() if n.startswith(path + ".")}
                out = functional_call(m.get_submodule(path), own, tuple(a), kw)
                outs += [t.reshape(-1) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            return torch.cat(outs)
        return fn

    targets = [Target(f"the modules fastctx.swap replaced in {config['head']}, swapped, at least as fast as the originals, {mode}",
                      "swapped", "original", mode, "speed", 1.0, "cpu", (torch.float32,)) for mode in ("fwd", "fwd+bwd")]
    return _original_vs_swapped(f"{name}-swapped-modules", pconfig, make, candidate, targets)


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


def import_toolboxes(heads: list[str]) -> None:
    """Import the toolboxes ``heads`` need (through tests/toolboxes.py); exit 2 naming what to
    install when one is missing."""
    try:
        from tests import toolboxes

        if any(h.startswith("mmseg-") for h in heads):
            toolboxes.mmseg()
        if any(h.startswith("ssseg-") for h in heads):
            toolboxes.ssseg_segmentor("isnet")
    except ImportError as e:
        print(f"{INSTALL}\n({e})", file=sys.stderr)
        sys.exit(2)


def parity_markdown(report: dict, cases: list[Case]) -> str:
    lines = ["## Parity and swaps", "",
             "Each candidate's logits against the original head run in float64 (relative error: max |diff| / max |truth|); "
             "what fastctx.swap replaced in the swapped copy.", "",
             "| case | candidate | parity | rel. error | swapped |", "|---|---|---|---|---|"]
    for case in cases:
        for cand in case.candidates:
            rows = [r for r in report["rows"] if r["case"] == case.name and r["candidate"] == cand]
            if not rows:
                continue
            verdict = rows[0]["status"].replace("|", "\\|")  # the failure message's "|diff|"
            err = rows[0].get("out_rel_err")
            swapped = "-" if cand == "original" else ("<br>".join(case.config["swapped"] or []) or "nothing")
            lines.append(f"| {case.name} | {cand} | **{verdict}** | {'-' if err is None else f'{err:.2g}'} | {swapped} |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="toolbox heads before and after fastctx.swap (see the module docstring)")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK[0]}x{QUICK[1]}x{QUICK[2]} features, widths / {QUICK_NARROW}, fewer repetitions")
    p.add_argument("--out", default="fastctx-heads-report", help="output folder (default ./fastctx-heads-report)")
    p.add_argument("--heads", help=f"comma-separated (default: all): {','.join(HEADS)}")
    p.add_argument("--size", help="BxHxW of the feature maps (default 2x64x128; --quick 2x33x65)")
    p.add_argument("--narrow", type=int, help="divide every width by this (default 1; --quick 8)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--backend", help="backend for the swapped modules (default: fastctx chooses per call)")
    p.add_argument("--reps", type=int, help="timed calls per candidate and mode, at least (default 5; --quick 3): "
                   "more where a head's seconds-long calls vary a lot between calls")
    args = p.parse_args(argv)
    heads = args.heads.split(",") if args.heads else list(HEADS)
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        p.error(f"unknown head(s) {unknown}; choose from {list(HEADS)}")
    size = tuple(int(s) for s in args.size.split("x")) if args.size else (QUICK if args.quick else FULL)
    if len(size) != 3:
        p.error(f"--size is BxHxW, got {args.size}")
    narrow = args.narrow or (QUICK_NARROW if args.quick else 1)
    import_toolboxes(heads)
    cases = [case for h in heads for case in head_cases(HEADS[h], size, narrow, args.backend)]

    def write_all(report: dict) -> tuple[dict, str]:
        paths = write(report, args.out)
        md = markdown(report).replace("# fastctx benchmark:", "# fastctx toolbox heads before and after fastctx.swap:", 1)
        md += "\n" + parity_markdown(report, cases)
        with open(paths["md"], "w") as f:
            f.write(md)
        return paths, md

    # written after each head too: a full run takes hours here, and one cut short keeps its heads
    report = run(device=args.device, dtypes=(torch.float32,), quick=args.quick, cases=cases, progress=write_all, reps=args.reps)
    paths, md = write_all(report)
    print()
    print(md)
    print(f"written: {', '.join(paths.values())}")
    failed = [f"{r['case']} {r['candidate']}: {r['status']}" for r in report["rows"] if r["status"].startswith(("FAILED", "error"))]
    if failed:
        print("PARITY FAILED OR ERROR:\n  " + "\n  ".join(dict.fromkeys(failed)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
