"""Drop-in swap: replace the context modules of a model people already have with fastctx's.

:func:`swap` walks any ``nn.Module`` and replaces, in place, each module it recognises with the
fastctx equivalent, built around the SAME submodules and ``Parameter`` objects, so the
``state_dict`` (keys and tensors), optimisers, EMA copies and checkpoints keep working. It never
imports a toolbox: a module is recognised by the dotted path of its exact class
(``type(m).__module__ + "." + type(m).__qualname__``), then its structure is verified (types and
shapes of its projections, no extra submodules, parameters or buffers, no forward overridden on
the instance). A module whose class is known but whose structure differs is left alone and
reported; a module of another class that merely shares a known class name (a vendored copy, a
subclass) is left alone and reported as a look-alike.

Adding a recogniser (the one place to edit)::

    @recogniser("some_toolbox.models.heads.ContextBlock",
                description="some_toolbox ContextBlock (SomeHead.context)")
    def _some_toolbox_block(m: nn.Module, backend: str | None) -> nn.Module:
        expect_children(m, ...)             # raise NotSwappable(reason) on any difference
        return FastBlock.from_modules(...)  # reuse m's submodules: never copy parameters

:func:`swap` then checks the contract for every converter: the new module's ``state_dict``
holds exactly the same keys bound to the same tensor objects (buffers too), and carries the
training flag and the hooks registered on the original over.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fastctx.backends import _check_name
from fastctx.nn.ann import AFNB, APNB, PyramidSelfAttentionBlock
from fastctx.nn.criss_cross import CrissCrossAttention, Scale
from fastctx.nn.interlaced import ISASelfAttentionBlock, interlaced_sparse_context
from fastctx.nn.isnet import ImageLevelContext, SemanticLevelContext
from fastctx.nn.ocr import ObjectAttention, SpatialGather

__all__ = [
    "FastISAForward",
    "FastISANetForward",
    "NotSwappable",
    "SwapEntry",
    "SwapError",
    "SwapReport",
    "class_path",
    "expect_children",
    "expect_class",
    "expect_attrs",
    "expect_conv1x1",
    "expect_conv_module",
    "expect_conv_modules",
    "expect_no_own_state",
    "fast_isanet_class",
    "isa_relations",
    "recogniser",
    "recognisers",
    "swap",
]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwapEntry:
    """One module that :func:`swap` looked at.

    Attributes:
        path (str): its dotted path in the model (``""`` for the model itself).
        original (str): dotted path of its class.
        replacement (str | None): dotted path of the fastctx class put in its place, or None.
        reason (str): why it was left alone (``""`` when it was swapped).
    """

    path: str
    original: str
    replacement: str | None = None
    reason: str = ""

    def __str__(self) -> str:
        where = self.path or "(the model itself)"
        if self.replacement is not None:
            return f"{where}: {self.original} -> {self.replacement}"
        return f"{where}: {self.original}: {self.reason}"


@dataclass
class SwapReport:
    """What :func:`swap` did.

    Attributes:
        swapped (list[SwapEntry]): modules replaced by their fastctx equivalent.
        left_alone (list[SwapEntry]): modules of a recognised class whose structure differs from
            what fastctx reproduces exactly; ``strict=True`` raises on these.
        look_alikes (list[SwapEntry]): modules of an unknown class that shares a recognised
            class's name (a vendored copy, a subclass): never touched, reported so a missed
            swap is visible.
    """

    swapped: list[SwapEntry] = field(default_factory=list)
    left_alone: list[SwapEntry] = field(default_factory=list)
    look_alikes: list[SwapEntry] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"fastctx.swap: {len(self.swapped)} swapped, {len(self.left_alone)} left alone, "
            f"{len(self.look_alikes)} look-alikes"
        ]
        for title, entries in (
            ("swapped", self.swapped),
            ("left alone", self.left_alone),
            ("look-alike", self.look_alikes),
        ):
            lines += [f"  {title:<10}  {e}" for e in entries]
        return "\n".join(lines)


class SwapError(RuntimeError):
    """``swap(..., strict=True)`` found recognised modules it could not swap; the model is
    unchanged. ``.report`` is the :class:`SwapReport` of the attempt (None when the error was
    re-raised by a registry that rebuilds exceptions from their message, as mmengine's does)."""

    def __init__(self, message: str, report: SwapReport | None = None) -> None:
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


class NotSwappable(Exception):
    """Raised by a converter: this recognised module's structure differs (the message says how)."""


Converter = Callable[[nn.Module, "str | None"], nn.Module]


@dataclass(frozen=True)
class Recogniser:
    """One entry of the registry.

    Attributes:
        class_path (str): dotted path of the exact class recognised.
        description (str): what it is, for people (``"mmcv CrissCrossAttention (...)"``).
        convert (Converter): ``convert(module, backend) -> fastctx module``; raises
            :class:`NotSwappable` when the structure differs; must reuse the module's own
            submodules / parameters / buffers.
    """

    class_path: str
    description: str
    convert: Converter


_REGISTRY: dict[str, Recogniser] = {}


def recogniser(*class_paths: str, description: str) -> Callable[[Converter], Converter]:
    """Decorator: register ``convert`` for each exact class in ``class_paths``."""

    def register(convert: Converter) -> Converter:
        for path in class_paths:
            if path in _REGISTRY:
                raise ValueError(f"fastctx.swap: {path} already has a recogniser")
            _REGISTRY[path] = Recogniser(path, description, convert)
        return convert

    return register


def recognisers() -> dict[str, str]:
    """``{class path: description}`` of every class :func:`swap` recognises."""
    return {path: r.description for path, r in _REGISTRY.items()}


def class_path(obj: object) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------------------------
# Structure checks for converters (each raises NotSwappable naming what differs)
# --------------------------------------------------------------------------------------------


def expect_children(m: nn.Module, *names: str) -> None:
    """``m``'s direct submodules are exactly ``names`` (none missing, none extra, none None)."""
    have = [n for n, c in m._modules.items() if c is not None]
    if sorted(have) != sorted(names):
        raise NotSwappable(f"submodules {have}, expected {list(names)}")


def expect_no_own_state(m: nn.Module) -> None:
    """``m`` has no parameters or buffers of its own (only its submodules' ones)."""
    own = [n for n, p in m._parameters.items() if p is not None]
    own += [n for n, b in m._buffers.items() if b is not None]
    if own:
        raise NotSwappable(f"has its own parameters/buffers {own}, expected none")


def expect_class(m: nn.Module, name: str, *paths: str) -> nn.Module:
    """Submodule ``name`` of ``m`` is exactly one of the classes ``paths``; returns it."""
    child = m._modules.get(name)
    if class_path(child) not in paths:
        raise NotSwappable(f"{name} is {class_path(child)}, expected {' or '.join(paths)}")
    return child


def expect_conv1x1(m: nn.Module, name: str, in_channels: int, out_channels: int, bias: bool = True) -> nn.Conv2d:
    """Submodule ``name`` is a plain ``nn.Conv2d`` 1x1, stride 1, no padding, one group, with
    the given channels and bias, and weights of that shape; returns it."""
    conv = expect_class(m, name, class_path(nn.Conv2d))
    got = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
           conv.dilation, conv.groups, conv.bias is not None)
    want = (in_channels, out_channels, (1, 1), (1, 1), (0, 0), (1, 1), 1, bias)
    if got != want:
        raise NotSwappable(
            f"{name} is Conv2d(in={got[0]}, out={got[1]}, kernel={got[2]}, stride={got[3]}, "
            f"padding={got[4]}, dilation={got[5]}, groups={got[6]}, bias={got[7]}), expected "
            f"Conv2d(in={in_channels}, out={out_channels}, kernel=(1, 1), stride=(1, 1), "
            f"padding=(0, 0), dilation=(1, 1), groups=1, bias={bias})"
        )
    if tuple(conv.weight.shape) != (out_channels, in_channels, 1, 1) or (
        bias and tuple(conv.bias.shape) != (out_channels,)
    ):
        raise NotSwappable(f"{name} holds a weight of shape {tuple(conv.weight.shape)}, "
                           f"expected {(out_channels, in_channels, 1, 1)}")
    return conv


MMCV_CONV_MODULE = "mmcv.cnn.bricks.conv_module.ConvModule"


def expect_conv_module(m: nn.Module, name: str, in_channels: int, out_channels: int) -> nn.Module:
    """Submodule ``name`` of ``m`` is an mmcv ``ConvModule`` whose ``conv`` is a plain 1x1
    ``nn.Conv2d`` ``in_channels -> out_channels`` (stride 1, no padding, one group); returns it.
    The converters reuse the ConvModule itself (its norm and activation run as they did), so
    only the shape of what it produces is verified."""
    cm = expect_class(m, name, MMCV_CONV_MODULE)
    try:
        expect_conv1x1(cm, "conv", in_channels, out_channels, bias=cm.conv.bias is not None)
    except NotSwappable as e:
        raise NotSwappable(f"{name}.{e}") from None
    return cm


def expect_conv_modules(m: nn.Module, name: str, in_channels: int, out_channels: int, count: int) -> nn.Module:
    """Submodule ``name`` of ``m`` is mmseg ``SelfAttentionBlock.build_project``'s projection
    with ``use_conv_module=True``: one mmcv ConvModule (``count == 1``) or an ``nn.Sequential`` of
    exactly ``count`` of them, ``in_channels -> out_channels -> ... -> out_channels``; returns it."""
    return _expect_stack(m, name, in_channels, out_channels, count, expect_conv_module, "ConvModules")


def _expect_stack(m: nn.Module, name: str, in_channels: int, out_channels: int, count: int,
                  expect_one: Callable[[nn.Module, str, int, int], nn.Module], what: str) -> nn.Module:
    """Submodule ``name`` of ``m`` is one block (``count == 1``) or an ``nn.Sequential`` of
    exactly ``count`` blocks, ``in_channels -> out_channels -> ... -> out_channels``, each checked
    by ``expect_one(parent, child_name, in, out)``; ``what`` names the blocks in the reason.
    Returns the block or the Sequential."""
    if count == 1:
        return expect_one(m, name, in_channels, out_channels)
    seq = expect_class(m, name, class_path(nn.Sequential))
    if len(seq) != count:
        raise NotSwappable(f"{name} holds {len(seq)} modules, expected {count} {what}")
    for i in range(count):
        try:
            expect_one(seq, str(i), in_channels if i == 0 else out_channels, out_channels)
        except NotSwappable as e:
            raise NotSwappable(f"{name}.{e}") from None
    return seq


def expect_attrs(m: nn.Module, **values: object) -> None:
    """``m``'s attributes have exactly these values (``None`` attributes too)."""
    for name, want in values.items():
        got = getattr(m, name, "<missing>")
        if got is not want and got != want:
            raise NotSwappable(f"{name} is {got!r}, expected {want!r}")


# --------------------------------------------------------------------------------------------
# swap
# --------------------------------------------------------------------------------------------

# nn.Module's hook dictionaries: shared with the replacement (same dict objects), so a hook
# registered on the original fires on the replacement and its handle still removes it.
_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _convert(module: nn.Module, rec: Recogniser, backend: str | None) -> nn.Module:
    if "forward" in vars(module):
        raise NotSwappable("its forward is overridden on the instance")
    flags = {id(m): m.training for m in module.modules()}
    new = rec.convert(module, backend)
    # The contract every converter must keep: same state_dict keys bound to the same tensors.
    old_sd, new_sd = module.state_dict(keep_vars=True), new.state_dict(keep_vars=True)
    old_buf, new_buf = dict(module.named_buffers()), dict(new.named_buffers())
    differ = sorted(
        {k for k in old_sd.keys() | new_sd.keys() if old_sd.get(k) is not new_sd.get(k)}
        | {k for k in old_buf.keys() | new_buf.keys() if old_buf.get(k) is not new_buf.get(k)}
    )
    if differ:
        raise RuntimeError(
            f"fastctx.swap: the converter for {rec.class_path} broke the contract (same state_dict "
            f"keys bound to the same tensors); these differ: {differ}"
        )
    # Each submodule keeps its own train/eval flag (a frozen BN, an eval-mode dropout stay so):
    # not new.train(), which would set the whole subtree. Modules the converter made take the
    # replaced module's flag.
    for m in new.modules():
        m.training = flags.get(id(m), module.training)
    if "_is_full_backward_hook" in vars(module):
        new._is_full_backward_hook = module._is_full_backward_hook
    for name in _HOOK_DICTS:
        if name in vars(module) and name in vars(new):
            setattr(new, name, getattr(module, name))
    return new


def swap(model: nn.Module, backend: str | None = None, strict: bool = False) -> tuple[nn.Module, SwapReport]:
    """Replace, in place, every context module of ``model`` that fastctx recognises with the
    fastctx equivalent, without changing what the model computes.

    Recognised (``fastctx.swap.recognisers()`` lists them): mmcv's ``CrissCrossAttention``
    (mmseg ``CCHead.cca``, sssegmentation ``CCNet.cca``) -> :class:`fastctx.nn.CrissCrossAttention`;
    mmseg ``OCRHead``'s ``SpatialGatherModule`` -> :class:`fastctx.nn.SpatialGather` and
    ``ObjectAttentionBlock`` -> :class:`fastctx.nn.ObjectAttention`; mmseg ``ISAHead`` -> the same
    head (a subclass of ``ISAHead`` sharing the original's submodules) whose relations are
    :class:`fastctx.nn.interlaced.ISASelfAttentionBlock` and whose padding / permute forward runs
    the fused interlaced attention; mmseg ``ANNHead``'s ``AFNB`` / ``APNB`` ->
    :class:`fastctx.nn.AFNB` / :class:`fastctx.nn.APNB`. sssegmentation's ISNet
    ``SemanticLevelContext`` / ``ImageLevelContext`` -> :class:`fastctx.nn.SemanticLevelContext` /
    :class:`fastctx.nn.ImageLevelContext`; its OCRNet ``SpatialGatherModule`` /
    ``ObjectContextBlock`` -> :class:`fastctx.nn.SpatialGather` / :class:`fastctx.nn.ObjectAttention`;
    its ``ISANet`` -> the same segmentor (a subclass of ``ISANet``) whose relations are
    ``ISASelfAttentionBlock`` s and whose padding / permute forward runs the fused interlaced
    attention (an ``isanet.SelfAttentionBlock`` outside a recognised ISANet -> an
    ``ISASelfAttentionBlock`` over the map it is given); its ``ANNNet``'s ``AFNBlock`` /
    ``APNBlock`` -> :class:`fastctx.nn.AFNB` / :class:`fastctx.nn.APNB`.

    The replacement is built around the original's own submodules: the same ``Parameter`` and
    buffer objects, so the ``state_dict`` is unchanged (keys and values), an optimiser built
    before the swap still updates the model, and checkpoints of the original load into the
    swapped model and back. A module shared by several parents stays shared. Hooks registered on
    a replaced module carry over, and so does the train/eval flag of each of its submodules (a
    frozen BN stays frozen, an eval-mode dropout stays off). Swapped modules are not searched
    further. The model is not copied: swap a ``copy.deepcopy`` to keep the original.

    One behaviour differs from the original modules: fastctx ops refuse NaN/inf inputs with a
    ValueError (``FASTCTX_CHECK_NAN=0`` turns that check off).

    Args:
        model (nn.Module): any module; the toolboxes it comes from are never imported here.
        backend (str | None): backend for the swapped modules (see :mod:`fastctx.backends`);
            None chooses per call. Default: None.
        strict (bool): raise :class:`SwapError`, leaving the model unchanged, when a recognised
            module could not be swapped. Default: False.

    Returns:
        tuple[nn.Module, SwapReport]: the model (a new object only when ``model`` itself was
        swapped) and the report of what was swapped and what was left alone, and why.

    Example::

        >>> head = mmseg_model.decode_head                   # an mmseg CCHead
        >>> model, report = fastctx.swap(mmseg_model)
        >>> print(report)
        fastctx.swap: 1 swapped, 0 left alone, 0 look-alikes
          swapped     decode_head.cca: mmcv.ops.cc_attention.CrissCrossAttention -> fastctx.nn.criss_cross.CrissCrossAttention
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastctx.swap: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        _check_name(backend, "fastctx.swap")
    if not isinstance(strict, bool):
        raise TypeError(f"fastctx.swap: strict must be a bool, got {type(strict).__name__}")

    report = SwapReport()
    known_names = {path.rsplit(".", 1)[1] for path in _REGISTRY}
    new_of: dict[int, nn.Module] = {}  # id(original) -> its replacement
    seen: set[int] = set()
    slots: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, name, original) to rewrite

    def visit(module: nn.Module, path: str) -> None:
        seen.add(id(module))
        cpath = class_path(module)
        rec = _REGISTRY.get(cpath)
        if rec is not None:
            try:
                new = _convert(module, rec, backend)
            except NotSwappable as e:
                report.left_alone.append(SwapEntry(path, cpath, None, str(e)))
            else:
                new_of[id(module)] = new
                report.swapped.append(SwapEntry(path, cpath, class_path(new)))
                return  # the replacement reuses the children: nothing further to swap inside
        elif type(module).__name__ in known_names and not cpath.startswith("fastctx."):
            report.look_alikes.append(SwapEntry(
                path, cpath, None,
                "not a class fastctx knows (same name as "
                + ", ".join(p for p in _REGISTRY if p.endswith("." + type(module).__name__))
                + "): left alone",
            ))
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            if id(child) not in seen:
                visit(child, f"{path}.{name}" if path else name)
            if id(child) in new_of:
                slots.append((module, name, child))

    visit(model, "")
    if strict and report.left_alone:
        raise SwapError(
            "fastctx.swap(strict=True): recognised modules could not be swapped; the model is "
            "unchanged.\n" + "\n".join(f"  {e}" for e in report.left_alone),
            report,
        )
    for parent, name, child in slots:
        parent._modules[name] = new_of[id(child)]
    return new_of.get(id(model), model), report


# --------------------------------------------------------------------------------------------
# Recognisers: one function per family of modules
# --------------------------------------------------------------------------------------------

_SCALES = ("mmcv.cnn.bricks.scale.Scale", class_path(Scale))


@recogniser(
    "mmcv.ops.cc_attention.CrissCrossAttention",
    description="mmcv CrissCrossAttention (mmseg CCHead.cca; sssegmentation CCNet.cca, which is mmcv's)",
)
def _mmcv_criss_cross(m: nn.Module, backend: str | None) -> nn.Module:
    """mmcv builds ``query_conv``/``key_conv`` 1x1 ``C -> C // 8``, ``value_conv`` 1x1
    ``C -> C`` (all with bias) and ``gamma = Scale(0.)``; its forward is ``x + gamma * CCA``."""
    expect_children(m, "query_conv", "key_conv", "value_conv", "gamma")
    expect_no_own_state(m)
    value = expect_class(m, "value_conv", class_path(nn.Conv2d))
    c = value.in_channels
    if getattr(m, "in_channels", c) != c:
        raise NotSwappable(f"in_channels is {m.in_channels} but value_conv takes {c}")
    if c < 8:
        raise NotSwappable(f"{c} channels: fastctx.nn.CrissCrossAttention needs at least 8")
    expect_conv1x1(m, "value_conv", c, c)
    expect_conv1x1(m, "query_conv", c, c // 8)
    expect_conv1x1(m, "key_conv", c, c // 8)
    gamma = expect_class(m, "gamma", *_SCALES)
    expect_children(gamma)
    names = [n for n, _ in gamma.named_parameters()]
    if names != ["scale"] or gamma.scale.shape != () or list(gamma.buffers()):
        raise NotSwappable(
            f"gamma holds {[(n, tuple(p.shape)) for n, p in gamma.named_parameters()]}, "
            "expected one 0-d parameter 'scale'"
        )
    return CrissCrossAttention.from_modules(m.query_conv, m.key_conv, m.value_conv, gamma, backend=backend)


@recogniser(
    "mmseg.models.decode_heads.ocr_head.SpatialGatherModule",
    description="mmseg SpatialGatherModule (OCRHead.spatial_gather_module)",
)
def _mmseg_spatial_gather(m: nn.Module, backend: str | None) -> nn.Module:
    """No parameters; softmax of ``scale * probs`` over the pixels, then ``probs @ feats``."""
    expect_children(m)
    expect_no_own_state(m)
    scale = getattr(m, "scale", None)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise NotSwappable(f"scale is {scale!r}, expected a positive number")
    return SpatialGather.from_modules(float(scale), backend=backend)


@recogniser(
    "mmseg.models.decode_heads.ocr_head.ObjectAttentionBlock",
    description="mmseg ObjectAttentionBlock (OCRHead.object_context_block)",
)
def _mmseg_object_attention(m: nn.Module, backend: str | None) -> nn.Module:
    """mmseg builds it as a ``SelfAttentionBlock`` with ``key_query_num_convs=2``,
    ``value_out_num_convs=1``, ConvModule projections, ``matmul_norm=True``, an out projection,
    no down-sampling (``scale=1``: for ``scale > 1`` its own forward fails) and a ConvModule
    ``bottleneck`` ``2C -> C``."""
    expect_children(m, "key_project", "query_project", "value_project", "out_project", "bottleneck")
    expect_no_own_state(m)
    expect_attrs(m, share_key_query=False, query_downsample=None, key_downsample=None, matmul_norm=True)
    c, cc = getattr(m, "key_in_channels", None), getattr(m, "channels", None)
    if not (isinstance(c, int) and isinstance(cc, int)):
        raise NotSwappable(f"key_in_channels={c!r}, channels={cc!r}: expected ints")
    expect_attrs(m, query_in_channels=c, out_channels=c)
    if m.query_project is m.key_project:
        raise NotSwappable("query_project is key_project (shared), expected two projections")
    expect_conv_modules(m, "key_project", c, cc, 2)
    expect_conv_modules(m, "query_project", c, cc, 2)
    expect_conv_modules(m, "value_project", c, cc, 1)
    expect_conv_modules(m, "out_project", cc, c, 1)
    expect_conv_modules(m, "bottleneck", 2 * c, c, 1)
    return ObjectAttention.from_modules(
        m.key_project, m.query_project, m.value_project, m.out_project, m.bottleneck, c, cc,
        conv_cfg=m.conv_cfg, norm_cfg=m.norm_cfg, act_cfg=m.act_cfg, backend=backend,
    )


# sssegmentation ISNet / OCRNet ----------------------------------------------------------------
#
# sssegmentation 1.7.0 builds these modules on ``segmentors/base/selfattention.py``'s
# SelfAttentionBlock, whose projections (``buildproject`` with ``use_norm=True``) are blocks
# ``nn.Sequential(Conv2d 1x1 without bias, BuildNormalization, BuildActivation)`` (nn.Identity for
# a None cfg), or an nn.Sequential of two such blocks; no mmcv ConvModule.

SSSEG_SELF_ATTENTION = "ssseg.modules.models.segmentors.base.selfattention.SelfAttentionBlock"
_SSSEG_ACT = "ssseg.modules.models.backbones.bricks.activation."
#: Norms under which fastctx.nn.SemanticLevelContext's key/value projections reproduce the dense
#: ones (BatchNorm on the class vectors with count-weighted statistics; GroupNorm on the full
#: pooled map), and activations that act on each element alone (run on the class vectors).
_SSSEG_SLC_NORMS = tuple(class_path(c) for c in (nn.Identity, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm))
_SSSEG_SLC_ACTS = tuple(class_path(c) for c in (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.Sigmoid, nn.SiLU, nn.ELU,
    nn.CELU, nn.SELU, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus,
)) + (_SSSEG_ACT + "hardswish.HardSwish", _SSSEG_ACT + "hardsigmoid.HardSigmoid", _SSSEG_ACT + "swish.Swish")


def _ssseg_block(parent: nn.Module, name: str, cin: int, cout: int, kernel: int, pixelwise: bool) -> None:
    """Submodule ``name`` is ``nn.Sequential(Conv2d(cin, cout, kernel, padding=kernel // 2,
    bias=False), norm, act)``; with ``pixelwise`` its norm and activation are ones
    :class:`fastctx.nn.SemanticLevelContext` runs on the class vectors."""
    seq = expect_class(parent, name, class_path(nn.Sequential))
    if list(seq._modules) != ["0", "1", "2"] or any(c is None for c in seq._modules.values()):
        raise NotSwappable(f"{name} holds {list(seq._modules)}, expected (Conv2d, norm, activation)")
    if kernel == 1:
        try:
            expect_conv1x1(seq, "0", cin, cout, bias=False)
        except NotSwappable as e:
            raise NotSwappable(f"{name}.{e}") from None
    else:
        conv = expect_class(seq, "0", class_path(nn.Conv2d))
        got = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
               conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        want = (cin, cout, (kernel, kernel), (1, 1), (kernel // 2, kernel // 2), (1, 1), 1, False, "zeros")
        if got != want or tuple(conv.weight.shape) != (cout, cin, kernel, kernel):
            raise NotSwappable(f"{name}.0 is {conv!r}, expected Conv2d({cin}, {cout}, kernel_size={kernel}, "
                               f"padding={kernel // 2}, bias=False)")
    norm, act = seq[1], seq[2]
    channels = getattr(norm, "num_features", getattr(norm, "num_channels", cout))
    if channels != cout:
        raise NotSwappable(f"{name}.1 normalises {channels} channels, expected {cout}")
    if pixelwise:
        if class_path(norm) not in _SSSEG_SLC_NORMS:
            raise NotSwappable(f"{name}.1 is {class_path(norm)}, expected one of {', '.join(_SSSEG_SLC_NORMS)}")
        if class_path(act) not in _SSSEG_SLC_ACTS:
            raise NotSwappable(f"{name}.2 is {class_path(act)}, expected an elementwise activation "
                               f"({', '.join(_SSSEG_SLC_ACTS)})")


def _ssseg_project(m: nn.Module, name: str, cin: int, cout: int, count: int, pixelwise: bool = False) -> nn.Module:
    """``SelfAttentionBlock.buildproject(use_norm=True)``: one block (``count == 1``) or an
    nn.Sequential of ``count`` blocks ``cin -> cout -> ... -> cout``; returns it."""
    def one(parent: nn.Module, child: str, i: int, o: int) -> nn.Module:
        _ssseg_block(parent, child, i, o, 1, pixelwise)
        return parent._modules[child]

    return _expect_stack(m, name, cin, cout, count, one, "blocks")


def _ssseg_in_channels(m: nn.Module, name: str) -> int:
    """``in_channels`` of the first convolution of projection ``name`` (then verified in full)."""
    p = m._modules.get(name)
    while isinstance(p, nn.Sequential) and len(p):
        p = p[0]
    if not isinstance(p, nn.Conv2d):
        raise NotSwappable(f"{name} holds no Conv2d first, expected (Conv2d, norm, activation) blocks")
    return p.in_channels


def _ssseg_attention(m: nn.Module, key_in: int, query_in: int, out: int, pixelwise_kv: bool) -> int:
    """``m`` holds a ``SelfAttentionBlock`` as ISNet and OCRNet build it: key/query 2 blocks
    ``-> transform_channels``, value and out 1 block, no sharing, no down-sampling,
    ``matmul_norm``, an out projection ``transform -> out``; returns ``transform_channels``."""
    if "forward" in vars(m):
        raise NotSwappable("its forward is overridden on the instance")
    expect_attrs(m, query_downsample=None, key_downsample=None, matmul_norm=True)
    t = getattr(m, "transform_channels", None)
    if isinstance(t, bool) or not isinstance(t, int):
        raise NotSwappable(f"transform_channels is {t!r}, expected an int")
    if m._modules.get("out_project") is None:
        raise NotSwappable("out_project is None (with_out_project=False), expected a projection")
    if m._modules.get("query_project") is m._modules.get("key_project"):
        raise NotSwappable("query_project is key_project (share_key_query=True), expected two projections")
    _ssseg_project(m, "key_project", key_in, t, 2, pixelwise_kv)
    _ssseg_project(m, "query_project", query_in, t, 2)
    _ssseg_project(m, "value_project", key_in, t, 1, pixelwise_kv)
    _ssseg_project(m, "out_project", t, out, 1)
    return t


def _ssseg_context(m: nn.Module, *others: str, key_factor: int, pixelwise_kv: bool):
    """ISNet's context modules: ``correlate_net`` (a SelfAttentionBlock, keys of ``key_factor *
    C`` channels), ``others`` and, with ``concat_input``, ``bottleneck`` (3x3 block ``2C -> C``);
    returns (correlate_net, bottleneck or None, C, transform_channels)."""
    expect_no_own_state(m)
    has_bottleneck = m._modules.get("bottleneck") is not None
    expect_children(m, *others, "correlate_net", *(("bottleneck",) if has_bottleneck else ()))
    net = expect_class(m, "correlate_net", SSSEG_SELF_ATTENTION)
    try:
        expect_children(net, "key_project", "query_project", "value_project", "out_project")
        expect_no_own_state(net)
        c = _ssseg_in_channels(net, "query_project")
        t = _ssseg_attention(net, key_factor * c, c, c, pixelwise_kv)
    except NotSwappable as e:
        raise NotSwappable(f"correlate_net: {e}") from None
    if has_bottleneck:
        _ssseg_block(m, "bottleneck", 2 * c, c, 3, False)
    return net, m._modules.get("bottleneck"), c, t


@recogniser(
    "ssseg.modules.models.segmentors.isnet.semanticlevel.SemanticLevelContext",
    description="sssegmentation SemanticLevelContext (ISNet.slc_net)",
)
def _ssseg_semantic_level(m: nn.Module, backend: str | None) -> nn.Module:
    """The dense semantic-level attention -> :class:`fastctx.nn.SemanticLevelContext` (its
    reduction to the K class vectors), around the same projections and bottleneck."""
    net, bottleneck, c, t = _ssseg_context(m, key_factor=1, pixelwise_kv=True)
    return SemanticLevelContext.from_modules(net.key_project, net.query_project, net.value_project,
                                             net.out_project, bottleneck, c, t, backend=backend)


@recogniser(
    "ssseg.modules.models.segmentors.isnet.imagelevel.ImageLevelContext",
    description="sssegmentation ImageLevelContext (ISNet.ilc_net)",
)
def _ssseg_image_level(m: nn.Module, backend: str | None) -> nn.Module:
    """``global_avgpool`` an ``AdaptiveAvgPool2d((1, 1))``, keys/values from ``2C`` channels
    -> :class:`fastctx.nn.ImageLevelContext` (runs no fastctx op: ``backend`` is unused)."""
    net, bottleneck, c, t = _ssseg_context(m, "global_avgpool", key_factor=2, pixelwise_kv=False)
    pool = expect_class(m, "global_avgpool", class_path(nn.AdaptiveAvgPool2d))
    if pool.output_size not in (1, (1, 1)):
        raise NotSwappable(f"global_avgpool.output_size is {pool.output_size!r}, expected (1, 1)")
    align_corners = getattr(m, "align_corners", None)
    if not isinstance(align_corners, bool):
        raise NotSwappable(f"align_corners is {align_corners!r}, expected a bool")
    return ImageLevelContext.from_modules(pool, net.key_project, net.query_project, net.value_project,
                                          net.out_project, bottleneck, c, t, align_corners)


# sssegmentation's SpatialGatherModule is mmseg's: no parameters, softmax of scale * probs over
# the pixels, regions [B, C, K, 1].
recogniser(
    "ssseg.modules.models.segmentors.ocrnet.spatialgather.SpatialGatherModule",
    description="sssegmentation SpatialGatherModule (OCRNet.spatial_gather_module)",
)(_mmseg_spatial_gather)


@recogniser(
    "ssseg.modules.models.segmentors.ocrnet.objectcontext.ObjectContextBlock",
    description="sssegmentation ObjectContextBlock (OCRNet.object_context_block)",
)
def _ssseg_object_context(m: nn.Module, backend: str | None) -> nn.Module:
    """A SelfAttentionBlock (see :func:`_ssseg_attention`) whose ``bottleneck`` is a 3x3 block
    ``2C -> C`` on ``cat([context, x])`` -> :class:`fastctx.nn.ObjectAttention`. ``scale > 1``
    (a MaxPool2d ``query_downsample``) is left alone: sssegmentation 1.7.0's own forward then
    fails (it reshapes the pooled queries' context to the full size)."""
    expect_no_own_state(m)
    if getattr(m, "query_downsample", None) is not None:
        raise NotSwappable(f"query_downsample is {m.query_downsample!r} (scale > 1): sssegmentation "
                           "1.7.0's own forward then fails, so there is nothing to reproduce")
    expect_children(m, "key_project", "query_project", "value_project", "out_project", "bottleneck")
    c = _ssseg_in_channels(m, "query_project")
    t = _ssseg_attention(m, c, c, c, False)
    _ssseg_block(m, "bottleneck", 2 * c, c, 3, False)
    return ObjectAttention.from_modules(m.key_project, m.query_project, m.value_project, m.out_project,
                                        m.bottleneck, c, t, backend=backend)


# mmseg ISAHead -------------------------------------------------------------------------------

MMSEG_ISA_BLOCK = "mmseg.models.decode_heads.isa_head.SelfAttentionBlock"


def _isa_relation(head: nn.Module, name: str, c: int) -> ISASelfAttentionBlock:
    """mmseg ``isa_head.SelfAttentionBlock(c, isa_channels)``: key/query projections 2 x
    ConvModule 1x1 ``c -> isa_channels``, value a plain 1x1 conv ``c -> c`` with bias, no
    ``out_project``, ``output_project`` ConvModule 1x1 ``c -> c``, ``matmul_norm``; all pointwise,
    so they run on the unpermuted map (the same pixels, so the same BN statistics)."""
    m = expect_class(head, name, MMSEG_ISA_BLOCK)
    try:
        if "forward" in vars(m):
            raise NotSwappable("its forward is overridden on the instance")
        expect_children(m, "key_project", "query_project", "value_project", "output_project")
        expect_no_own_state(m)
        expect_attrs(m, share_key_query=False, query_downsample=None, key_downsample=None,
                     matmul_norm=True, out_project=None, key_in_channels=c, query_in_channels=c,
                     out_channels=c)
        cc = getattr(m, "channels", None)
        if not isinstance(cc, int):
            raise NotSwappable(f"channels is {cc!r}, expected an int")
        expect_conv_modules(m, "key_project", c, cc, 2)
        expect_conv_modules(m, "query_project", c, cc, 2)
        expect_conv1x1(m, "value_project", c, c)
        expect_conv_modules(m, "output_project", c, c, 1)
    except NotSwappable as e:
        raise NotSwappable(f"{name}: {e}") from None
    return ISASelfAttentionBlock.from_modules(m.key_project, m.query_project, m.value_project,
                                              m.output_project, cc)


def isa_relations(head: nn.Module) -> tuple[ISASelfAttentionBlock, ISASelfAttentionBlock]:
    """Verify an mmseg ``ISAHead``'s structure and build fastctx relations around its
    ``global_relation`` / ``local_relation`` projections (raises :class:`NotSwappable`)."""
    c = getattr(head, "channels", None)
    if not isinstance(c, int):
        raise NotSwappable(f"channels is {c!r}, expected an int")
    down = getattr(head, "down_factor", None)
    if (not isinstance(down, (tuple, list)) or len(down) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in down)):
        raise NotSwappable(f"down_factor is {down!r}, expected two positive ints")
    for name in ("in_conv", "out_conv", "conv_seg"):
        if not isinstance(head._modules.get(name), nn.Module):
            raise NotSwappable(f"has no submodule {name}")
    return _isa_relation(head, "global_relation", c), _isa_relation(head, "local_relation", c)


class FastISAForward:
    """Mixin: mmseg ``ISAHead.forward`` with its relations as fastctx
    :class:`~fastctx.nn.interlaced.ISASelfAttentionBlock` s: ``in_conv``, the interlaced
    attention (:func:`~fastctx.nn.interlaced.interlaced_sparse_context`: pad, long-range then
    short-range groups, crop, without mmseg's permutes), ``out_conv(cat([context, x]))``,
    ``cls_seg``. ``fastctx_backend`` is the backend of the fused op."""

    fastctx_backend: str | None = None

    def forward(self, inputs):
        x = self.in_conv(self._transform_inputs(inputs))
        context = interlaced_sparse_context(x, self.global_relation, self.local_relation,
                                            tuple(self.down_factor), False, self.fastctx_backend)
        return self.cls_seg(self.out_conv(torch.cat([context, x], dim=1)))


_FAST_HEADS: dict[type, type] = {}


def _fast_isa_class(base: type) -> type:
    cls = _FAST_HEADS.get(base)
    if cls is None:
        cls = type("FastISAHead", (FastISAForward, base), {
            "__module__": __name__, "__qualname__": "FastISAHead",
            "__doc__": f"{class_path(base)} on fastctx's interlaced attention (made by fastctx.swap).",
        })
        _FAST_HEADS[base] = cls
    return cls


@recogniser(
    "mmseg.models.decode_heads.isa_head.ISAHead",
    description="mmseg ISAHead (global_relation / local_relation and its padding/permute forward)",
)
def _mmseg_isa_head(m: nn.Module, backend: str | None) -> nn.Module:
    """The replacement is an instance of a subclass of ``type(m)`` (so mmseg's losses,
    ``predict`` and ``cls_seg`` are unchanged) holding the same submodules, with the two
    relations rebuilt by :func:`isa_relations` and the forward of :class:`FastISAForward`."""
    global_relation, local_relation = isa_relations(m)
    new = object.__new__(_fast_isa_class(type(m)))
    new.__dict__.update(m.__dict__)
    for name in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
        if name in vars(m):
            new.__dict__[name] = copy.copy(vars(m)[name])  # the original keeps its own
    new._modules["global_relation"] = global_relation
    new._modules["local_relation"] = local_relation
    new.fastctx_backend = backend
    return new


# mmseg ANNHead -------------------------------------------------------------------------------

MMSEG_ANN_BLOCK = "mmseg.models.decode_heads.ann_head.SelfAttentionBlock"
MMSEG_PPM_CONCAT = "mmseg.models.decode_heads.ann_head.PPMConcat"


def _ann_stage(parent: nn.Module, index: str, low: int, high: int, out: int, shared: bool) -> PyramidSelfAttentionBlock:
    """mmseg ``ann_head.SelfAttentionBlock`` with ``query_scale=1`` (mmseg's own forward fails
    for more): key/query ConvModule 1x1 ``-> channels`` (one shared module when ``shared``),
    value and out plain 1x1 convs with bias, ``key_downsample`` a ``PPMConcat`` of square
    ``AdaptiveAvgPool2d`` s, ``matmul_norm``."""
    m = expect_class(parent, index, MMSEG_ANN_BLOCK)
    try:
        if "forward" in vars(m):
            raise NotSwappable("its forward is overridden on the instance")
        expect_children(m, "key_project", "query_project", "value_project", "out_project", "key_downsample")
        expect_no_own_state(m)
        expect_attrs(m, share_key_query=shared, query_downsample=None, matmul_norm=True,
                     key_in_channels=low, query_in_channels=high, out_channels=out)
        if (m.query_project is m.key_project) != shared:
            raise NotSwappable(f"query_project is{' not' if shared else ''} key_project, expected the opposite")
        cc = getattr(m, "channels", None)
        if not isinstance(cc, int):
            raise NotSwappable(f"channels is {cc!r}, expected an int")
        expect_conv_modules(m, "key_project", low, cc, 1)
        expect_conv_modules(m, "query_project", high, cc, 1)
        expect_conv1x1(m, "value_project", low, cc)
        expect_conv1x1(m, "out_project", cc, out)
        ppm = expect_class(m, "key_downsample", MMSEG_PPM_CONCAT)
        scales = []
        for i, pool in enumerate(ppm):
            size = getattr(pool, "output_size", None)
            if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
                size = size[0]
            if class_path(pool) != class_path(nn.AdaptiveAvgPool2d) or not (
                    isinstance(size, int) and not isinstance(size, bool) and size > 0):
                raise NotSwappable(f"key_downsample.{i} is {pool!r}, expected AdaptiveAvgPool2d(<positive int>)")
            scales.append(size)
        if not scales or list(ppm.children()) != list(ppm):
            raise NotSwappable("key_downsample holds no pooling scales")
    except NotSwappable as e:
        raise NotSwappable(f"stages.{index}: {e}") from None
    return PyramidSelfAttentionBlock.from_modules(m.key_project, m.query_project, m.value_project,
                                                  m.out_project, cc, scales)


def _ann_stages(m: nn.Module, low: int, high: int, out: int, shared: bool, backend: str | None) -> list:
    expect_children(m, "stages", "bottleneck")
    expect_no_own_state(m)
    stages = expect_class(m, "stages", class_path(nn.ModuleList))
    if len(stages) == 0:
        raise NotSwappable("stages is empty")
    blocks = [_ann_stage(stages, str(i), low, high, out, shared) for i in range(len(stages))]
    for b in blocks:
        b.backend = backend
    return blocks


@recogniser("mmseg.models.decode_heads.ann_head.AFNB", description="mmseg AFNB (ANNHead.fusion)")
def _mmseg_afnb(m: nn.Module, backend: str | None) -> nn.Module:
    """Stages with separate query/key projections (queries from the high-level map, keys and
    values from the low-level one), summed; ``bottleneck`` ConvModule 1x1 ``out + high -> out``."""
    first = m._modules.get("stages")
    first = first[0] if isinstance(first, nn.ModuleList) and len(first) else None
    if first is None or class_path(first) != MMSEG_ANN_BLOCK:
        raise NotSwappable(f"stages holds {class_path(first) if first is not None else 'nothing'}, "
                           f"expected {MMSEG_ANN_BLOCK}")
    low, high, out = first.key_in_channels, first.query_in_channels, first.out_channels
    blocks = _ann_stages(m, low, high, out, False, backend)
    expect_conv_modules(m, "bottleneck", out + high, out, 1)
    return AFNB.from_modules(blocks, m.bottleneck, low, high)


@recogniser("mmseg.models.decode_heads.ann_head.APNB", description="mmseg APNB (ANNHead.context)")
def _mmseg_apnb(m: nn.Module, backend: str | None) -> nn.Module:
    """Stages with one shared query/key projection of the same map, summed; ``bottleneck``
    ConvModule 1x1 ``2C -> C``."""
    first = m._modules.get("stages")
    first = first[0] if isinstance(first, nn.ModuleList) and len(first) else None
    if first is None or class_path(first) != MMSEG_ANN_BLOCK:
        raise NotSwappable(f"stages holds {class_path(first) if first is not None else 'nothing'}, "
                           f"expected {MMSEG_ANN_BLOCK}")
    c = first.key_in_channels
    blocks = _ann_stages(m, c, c, c, True, backend)
    expect_conv_modules(m, "bottleneck", 2 * c, c, 1)
    return APNB.from_modules(blocks, m.bottleneck, c)


# ============================================================================================
# sssegmentation 1.7.0: ISANet (global_relation / local_relation and its padding/permute
# forward) and ANNNet (AFNBlock / APNBlock)
# ============================================================================================
#
# sssegmentation builds its projections with ``base.SelfAttentionBlock.buildproject``: a plain
# ``nn.Conv2d`` 1x1 without bias when unnormalised, else ``nn.Sequential(Conv2d 1x1, norm, act)``
# (an ``nn.Sequential`` of those for more than one conv); so its state-dict keys are
# ``key_project.0.weight``, ``key_project.1.running_mean``, ... (not mmcv's ``.conv`` / ``.bn``).

SSSEG_SEGMENTORS = "ssseg.modules.models.segmentors"
SSSEG_ISANET = f"{SSSEG_SEGMENTORS}.isanet.isanet.ISANet"
SSSEG_ISA_BLOCK = f"{SSSEG_SEGMENTORS}.isanet.isanet.SelfAttentionBlock"
SSSEG_SA_BLOCK = f"{SSSEG_SEGMENTORS}.base.selfattention.SelfAttentionBlock"
SSSEG_PPM_CONCAT = f"{SSSEG_SEGMENTORS}.annnet.ppm.PPMConcat"
SSSEG_AFN_BLOCK = f"{SSSEG_SEGMENTORS}.annnet.afnblock.AFNBlock"
SSSEG_APN_BLOCK = f"{SSSEG_SEGMENTORS}.annnet.apnblock.APNBlock"

# Norms whose statistics do not depend on how the pixels are grouped into a batch: sssegmentation's
# ISANet runs its relations on the map permuted into groups (one batch entry per group), fastctx
# on the whole map; batch norm sees the same pixels either way, a per-image norm (GroupNorm,
# InstanceNorm, ...) would not. ``nn.Identity`` is what ssseg builds for ``norm_cfg=None``.
_SSSEG_NORMS = (class_path(nn.BatchNorm2d), class_path(nn.SyncBatchNorm), class_path(nn.Identity))
# Elementwise activations of ssseg's ActivationBuilder (``nn.Identity`` for ``act_cfg=None``).
_SSSEG_ACTS = tuple(class_path(getattr(nn, name)) for name in (
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "GELU", "Sigmoid", "SiLU", "ELU", "CELU", "SELU", "Tanh",
    "Mish", "Softplus", "Hardtanh", "Identity",
)) + tuple(f"ssseg.modules.models.backbones.bricks.activation.{m}.{c}" for m, c in (
    ("hardswish", "HardSwish"), ("hardsigmoid", "HardSigmoid"), ("swish", "Swish"),
))


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _expect_ssseg_conv_norm_act(m: nn.Module, name: str, in_channels: int, out_channels: int,
                                act: bool = True) -> nn.Sequential:
    """Submodule ``name`` of ``m`` is ssseg's ``nn.Sequential(Conv2d 1x1 in -> out, norm[, act])``
    with a batch norm (or Identity) over ``out_channels`` and an elementwise activation."""
    seq = expect_class(m, name, class_path(nn.Sequential))
    if len(seq) != (3 if act else 2):
        raise NotSwappable(f"{name} holds {len(seq)} modules, expected Conv2d, norm{', activation' if act else ''}")
    try:
        expect_conv1x1(seq, "0", in_channels, out_channels, bias=seq[0].bias is not None)
        norm = seq[1]
        if class_path(norm) not in _SSSEG_NORMS:
            raise NotSwappable(f"1 is {class_path(norm)}, expected one of {', '.join(_SSSEG_NORMS)}")
        if not isinstance(norm, nn.Identity) and norm.num_features != out_channels:
            raise NotSwappable(f"1 normalises {norm.num_features} channels, expected {out_channels}")
        if act and class_path(seq[2]) not in _SSSEG_ACTS:
            raise NotSwappable(f"2 is {class_path(seq[2])}, expected an elementwise activation")
    except NotSwappable as e:
        raise NotSwappable(f"{name}.{e}") from None
    return seq


def _expect_ssseg_project(m: nn.Module, name: str, in_channels: int, out_channels: int,
                          num_convs: int) -> nn.Sequential:
    """``buildproject(..., num_convs, use_norm=True)``: one conv-norm-act ``nn.Sequential``, or
    an ``nn.Sequential`` of ``num_convs`` of them, ``in -> out -> ... -> out``."""
    return _expect_stack(m, name, in_channels, out_channels, num_convs, _expect_ssseg_conv_norm_act,
                         "conv-norm-act blocks")


def _transform_channels(m: nn.Module) -> int:
    cc = getattr(m, "transform_channels", None)
    if not _positive_int(cc):
        raise NotSwappable(f"transform_channels is {cc!r}, expected a positive int")
    return cc


# ssseg ISANet --------------------------------------------------------------------------------


def _ssseg_isa_relation(m: nn.Module, backend: str | None) -> ISASelfAttentionBlock:
    """ssseg ``isanet.SelfAttentionBlock(c, isa_channels)``: key/query 2 x conv-norm-act 1x1
    ``c -> isa_channels``, value a plain 1x1 conv ``c -> c`` (no bias), no ``out_project``,
    ``output_project`` conv-norm-act 1x1 ``c -> c``, ``matmul_norm`` (scale
    ``transform_channels ** -0.5``), no down-sampling: full attention over the map it is given."""
    if "forward" in vars(m):
        raise NotSwappable("its forward is overridden on the instance")
    expect_children(m, "key_project", "query_project", "value_project", "output_project")
    expect_no_own_state(m)
    expect_attrs(m, query_downsample=None, key_downsample=None, matmul_norm=True, out_project=None)
    if m.query_project is m.key_project:
        raise NotSwappable("query_project is key_project (shared), expected two projections")
    cc = _transform_channels(m)
    value = expect_class(m, "value_project", class_path(nn.Conv2d))
    c = value.in_channels
    expect_conv1x1(m, "value_project", c, c, bias=value.bias is not None)
    _expect_ssseg_project(m, "key_project", c, cc, 2)
    _expect_ssseg_project(m, "query_project", c, cc, 2)
    _expect_ssseg_project(m, "output_project", c, c, 1)
    return ISASelfAttentionBlock.from_modules(m.key_project, m.query_project, m.value_project,
                                              m.output_project, cc, backend=backend)


@recogniser(
    SSSEG_ISA_BLOCK,
    description="sssegmentation ISANet's SelfAttentionBlock (ISANet.global_relation / local_relation)",
)
def _ssseg_isa_block(m: nn.Module, backend: str | None) -> nn.Module:
    """Alone (not inside a recognised ``ISANet``): the relation run on whatever map it is given
    (sssegmentation's ISANet forward gives it the permuted groups) as one group of the fused
    interlaced attention; inside a recognised ``ISANet`` the whole segmentor is swapped instead."""
    return _ssseg_isa_relation(m, backend)


class FastISANetForward:
    """Mixin: sssegmentation ``ISANet.forward`` with its relations as fastctx
    :class:`~fastctx.nn.interlaced.ISASelfAttentionBlock` s: backbone, ``in_conv``, the
    interlaced attention (:func:`~fastctx.nn.interlaced.interlaced_sparse_context`: pad, long-range
    then short-range groups, crop, without the permuted copies), ``out_conv(cat([context, feats]))``,
    ``decoder``, then ssseg's losses / outputs as ``ISANet.forward`` returns them. The backend is
    each relation's ``backend``."""

    _ssseg_output: Callable = None  # ssseg's SSSegOutputStructure, set by fast_isanet_class

    def forward(self, data_meta):
        img_size = data_meta.images.size(2), data_meta.images.size(3)
        backbone_outputs = self.transforminputs(
            self.backbone_net(data_meta.images), selected_indices=self.cfg["backbone"].get("selected_indices"))
        feats = self.in_conv(backbone_outputs[-1])
        context = interlaced_sparse_context(feats, self.global_relation, self.local_relation,
                                            tuple(self.down_factor))
        seg_logits = self.decoder(self.out_conv(torch.cat([context, feats], dim=1)))
        if self.mode in ("TRAIN", "TRAIN_DEVELOP"):
            loss, losses_log_dict = self.customizepredsandlosses(
                seg_logits=seg_logits, annotations=data_meta.getannotations(),
                backbone_outputs=backbone_outputs, losses_cfg=self.cfg["losses"], img_size=img_size,
            )
            if self.mode == "TRAIN":
                return self._ssseg_output(mode=self.mode, loss=loss, losses_log_dict=losses_log_dict)
            return self._ssseg_output(mode=self.mode, loss=loss, losses_log_dict=losses_log_dict,
                                      seg_logits=seg_logits)
        return self._ssseg_output(mode=self.mode, seg_logits=seg_logits)


_FAST_ISANETS: dict[type, type] = {}


def fast_isanet_class(base: type) -> type:
    """The subclass of ``base`` (sssegmentation's ``ISANet`` or a subclass of it) with
    :class:`FastISANetForward`'s forward: what :func:`swap` makes of an ``ISANet``, and the base
    of the plugin segmentor ``fastctx.integrations.sssegmentation.FastISANet``."""
    cls = _FAST_ISANETS.get(base)
    if cls is None:
        isanet = next((k for k in base.__mro__ if class_path(k) == SSSEG_ISANET), None)
        if isanet is None:
            raise TypeError(f"fastctx.swap.fast_isanet_class: {class_path(base)} is not {SSSEG_ISANET} "
                            "or a subclass of it")
        import sys  # the ssseg module defining ISANet is loaded: an instance of it is being swapped

        output = sys.modules[isanet.__module__].SSSegOutputStructure
        cls = type("FastISANet", (FastISANetForward, base), {
            "__module__": __name__, "__qualname__": "FastISANet", "_ssseg_output": staticmethod(output),
            "__doc__": f"{class_path(base)} on fastctx's interlaced attention (made by fastctx.swap).",
        })
        _FAST_ISANETS[base] = cls
    return cls


@recogniser(
    SSSEG_ISANET,
    description="sssegmentation ISANet (global_relation / local_relation and its padding/permute forward)",
)
def _ssseg_isanet(m: nn.Module, backend: str | None) -> nn.Module:
    """The replacement is an instance of a subclass of ``type(m)`` (:func:`fast_isanet_class`:
    ssseg's losses, inference and ``train`` / ``eval`` are unchanged) holding the same submodules,
    with the two relations rebuilt around their projections and the forward of
    :class:`FastISANetForward`. Like every swapped module it is not searched further: in
    sssegmentation 1.7.0 its other submodules (backbone, ``in_conv``, ``out_conv``, decoders) hold
    nothing fastctx recognises."""
    down = getattr(m, "down_factor", None)
    if not isinstance(down, (tuple, list)) or len(down) != 2 or not all(_positive_int(d) for d in down):
        raise NotSwappable(f"down_factor is {down!r}, expected two positive ints")
    relations = {}
    for name in ("global_relation", "local_relation"):
        rel = expect_class(m, name, SSSEG_ISA_BLOCK)
        try:
            relations[name] = _ssseg_isa_relation(rel, backend)
        except NotSwappable as e:
            raise NotSwappable(f"{name}: {e}") from None
    c = relations["global_relation"].value_project.in_channels
    if relations["local_relation"].value_project.in_channels != c:
        raise NotSwappable(f"global_relation takes {c} channels, local_relation "
                           f"{relations['local_relation'].value_project.in_channels}")
    for name, index, attr, want in (("in_conv", 0, "out_channels", c), ("out_conv", 0, "in_channels", 2 * c)):
        seq = expect_class(m, name, class_path(nn.Sequential))
        first = seq[index] if len(seq) else None
        if not isinstance(first, nn.Conv2d) or getattr(first, attr) != want:
            raise NotSwappable(f"{name}.{index} is {first!r}, expected a Conv2d with {attr}={want}")
    for name in ("backbone_net", "decoder"):
        if not isinstance(m._modules.get(name), nn.Module):
            raise NotSwappable(f"has no submodule {name}")
    new = object.__new__(fast_isanet_class(type(m)))
    new.__dict__.update(m.__dict__)
    for name in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
        if name in vars(m):
            new.__dict__[name] = copy.copy(vars(m)[name])  # the original keeps its own
    new._modules.update(relations)
    return new


# ssseg ANNNet --------------------------------------------------------------------------------


def _ssseg_ann_stage(stages: nn.Module, index: str, low: int, high: int, out: int, shared: bool,
                     backend: str | None) -> PyramidSelfAttentionBlock:
    """ssseg ``base.SelfAttentionBlock`` as AFNBlock / APNBlock build it: key/query one
    conv-norm-act 1x1 ``-> transform_channels`` (one shared module when ``shared``), value and out
    plain 1x1 convs, ``key_downsample`` a ``PPMConcat`` of square ``AdaptiveAvgPool2d`` s,
    ``matmul_norm``, no ``query_downsample`` (``query_scale=1``)."""
    m = expect_class(stages, index, SSSEG_SA_BLOCK)
    try:
        if "forward" in vars(m):
            raise NotSwappable("its forward is overridden on the instance")
        down = m._modules.get("query_downsample")
        if down is not None:
            raise NotSwappable(
                f"query_downsample is {down!r} (query_scales > 1): sssegmentation's forward reshapes "
                "the pooled context to the query's full size, which fails, so there is nothing to reproduce")
        expect_children(m, "key_project", "query_project", "value_project", "out_project", "key_downsample")
        expect_no_own_state(m)
        expect_attrs(m, query_downsample=None, matmul_norm=True)
        if (m.query_project is m.key_project) != shared:
            raise NotSwappable(f"query_project is{' not' if shared else ''} key_project, expected the opposite")
        cc = _transform_channels(m)
        _expect_ssseg_project(m, "key_project", low, cc, 1)
        _expect_ssseg_project(m, "query_project", high, cc, 1)
        expect_conv1x1(m, "value_project", low, cc, bias=getattr(m.value_project, "bias", None) is not None)
        expect_conv1x1(m, "out_project", cc, out, bias=getattr(m.out_project, "bias", None) is not None)
        ppm = expect_class(m, "key_downsample", SSSEG_PPM_CONCAT)
        if "forward" in vars(ppm):
            raise NotSwappable("key_downsample's forward is overridden on the instance")
        expect_children(ppm, "pool_nets")
        pools = expect_class(ppm, "pool_nets", class_path(nn.ModuleList))
        scales = []
        for i, pool in enumerate(pools):
            size = getattr(pool, "output_size", None)
            if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
                size = size[0]
            if class_path(pool) != class_path(nn.AdaptiveAvgPool2d) or not _positive_int(size):
                raise NotSwappable(f"key_downsample.pool_nets.{i} is {pool!r}, "
                                   "expected AdaptiveAvgPool2d(<positive int>)")
            scales.append(size)
        if not scales:
            raise NotSwappable("key_downsample holds no pooling scales")
    except NotSwappable as e:
        raise NotSwappable(f"stages.{index}: {e}") from None
    return PyramidSelfAttentionBlock.from_modules(m.key_project, m.query_project, m.value_project,
                                                  m.out_project, cc, scales, backend=backend)


def _ssseg_ann_channels(m: nn.Module) -> tuple[int, int, int]:
    """(low, high, out) channels read off ``stages.0`` (the stage checks then verify them)."""
    stages = m._modules.get("stages")
    first = stages[0] if isinstance(stages, nn.ModuleList) and len(stages) else None
    if first is None or class_path(first) != SSSEG_SA_BLOCK:
        raise NotSwappable(f"stages holds {class_path(first) if first is not None else 'nothing'}, "
                           f"expected {SSSEG_SA_BLOCK}")
    query, value, out = (first._modules.get(n) for n in ("query_project", "value_project", "out_project"))
    query = query[0] if isinstance(query, nn.Sequential) and len(query) else None
    if not all(isinstance(conv, nn.Conv2d) for conv in (query, value, out)):
        raise NotSwappable("stages.0: query_project.0, value_project and out_project are not all Conv2d")
    return value.in_channels, query.in_channels, out.out_channels


def _ssseg_ann_stages(m: nn.Module, low: int, high: int, out: int, shared: bool, backend: str | None) -> list:
    expect_children(m, "stages", "bottleneck")
    expect_no_own_state(m)
    stages = expect_class(m, "stages", class_path(nn.ModuleList))
    return [_ssseg_ann_stage(stages, str(i), low, high, out, shared, backend) for i in range(len(stages))]


@recogniser(SSSEG_AFN_BLOCK, description="sssegmentation AFNBlock (ANNNet.afn_block)")
def _ssseg_afnb(m: nn.Module, backend: str | None) -> nn.Module:
    """Stages with separate query/key projections (queries from the high-level map, keys and
    values from the low-level one), summed; ``bottleneck`` conv-norm 1x1 ``out + high -> out``
    (no activation)."""
    low, high, out = _ssseg_ann_channels(m)
    blocks = _ssseg_ann_stages(m, low, high, out, False, backend)
    _expect_ssseg_conv_norm_act(m, "bottleneck", out + high, out, act=False)
    return AFNB.from_modules(blocks, m.bottleneck, low, high)


@recogniser(SSSEG_APN_BLOCK, description="sssegmentation APNBlock (ANNNet.apn_block)")
def _ssseg_apnb(m: nn.Module, backend: str | None) -> nn.Module:
    """Stages with one shared query/key projection of the same map, summed; ``bottleneck``
    conv-norm-act 1x1 ``2C -> C``."""
    c, high, out = _ssseg_ann_channels(m)
    if high != c or out != c:
        raise NotSwappable(f"stages.0 maps {c} (keys) / {high} (queries) channels to {out}, expected "
                           "the same number")
    blocks = _ssseg_ann_stages(m, c, c, c, True, backend)
    _expect_ssseg_conv_norm_act(m, "bottleneck", 2 * c, c)
    return APNB.from_modules(blocks, m.bottleneck, c)
