"""Backbones with mmsegmentation 1.2.2's state-dict layout: ResNet-V1c (deep stem, dilated "D8")
and HRNetV2.

The module names are those of ``mmseg.models.backbones.ResNetV1c`` and ``mmseg.models.backbones.HRNet``
(``stem.*``, ``layer{1..4}.N.conv1/bn1/...``, ``downsample.{0,1}``; HRNet's ``conv1``, ``bn1``,
``transition{1..3}``, ``stage{2..4}.M.branches/fuse_layers``), so an mmseg checkpoint's
``backbone.*`` entries load with ``load_state_dict(strict=True)``. No fastctx op runs in a
backbone: they are plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fastctx.nn._conv import BN, build_norm

__all__ = ["HRNET_W18", "HRNET_W48", "HRNet", "ResNetV1c", "hrnet_extra"]


def _norm(norm_cfg: Mapping, channels: int, where: str) -> nn.Module:
    return build_norm(norm_cfg, channels, where)[1]


def _conv(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """mmseg's ``BasicBlock``: 3x3 (stride, dilation) -> 3x3, keys ``conv1, bn1, conv2, bn2,
    downsample``."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        norm_cfg: Mapping = BN,
    ) -> None:
        super().__init__()
        where = "fastctx.models.BasicBlock"
        self.conv1 = _conv(inplanes, planes, 3, stride, dilation, dilation)
        self.bn1 = _norm(norm_cfg, planes, where)
        self.conv2 = _conv(planes, planes, 3, 1, 1)
        self.bn2 = _norm(norm_cfg, planes, where)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """mmseg's ``Bottleneck`` (``style='pytorch'``: the stride on the 3x3 conv), keys
    ``conv1..3, bn1..3, downsample``."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        norm_cfg: Mapping = BN,
    ) -> None:
        super().__init__()
        where = "fastctx.models.Bottleneck"
        self.conv1 = _conv(inplanes, planes, 1)
        self.bn1 = _norm(norm_cfg, planes, where)
        self.conv2 = _conv(planes, planes, 3, stride, dilation, dilation)
        self.bn2 = _norm(norm_cfg, planes, where)
        self.conv3 = _conv(planes, planes * self.expansion, 1)
        self.bn3 = _norm(norm_cfg, planes * self.expansion, where)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _init(module: nn.Module, zero_init_residual: bool) -> None:
    """mmseg's default backbone init (``Kaiming`` on convs: normal, fan_out; norms 1 / 0), and the
    last norm of every residual block at 0 when ``zero_init_residual``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in module.modules():
            if isinstance(m, (BasicBlock, Bottleneck)) and m.last_norm.weight is not None:
                nn.init.zeros_(m.last_norm.weight)


def _check_image(where: str, x: object, in_channels: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: the input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{where}: the input must be [B, {in_channels}, H, W], got {tuple(x.shape)}")


class ResNetV1c(nn.Module):
    """ResNet-V1c: mmseg's ``ResNetV1c`` (deep stem, ``avg_down=False``, ``style='pytorch'``).

    Stem: three 3x3 convs ``3 -> stem_channels // 2 -> stem_channels // 2 -> stem_channels``
    (the first with stride 2), each with norm and ReLU (keys ``stem.{0,1,3,4,6,7}``), then a 3x3
    max-pool with stride 2. Stages ``layer1..4`` of ``base_channels * 2**i`` planes. The defaults
    are the dilated "D8" configuration of mmseg's ``*-d8`` configs: strides ``(1, 2, 1, 1)``,
    dilations ``(1, 1, 2, 4)``, ``contract_dilation=True`` (the first block of a dilated stage uses
    half the dilation), so the output stride is 8.

    Args:
        depth (int): 18, 34, 50, 101 or 152.
        in_channels (int): Default: 3.
        stem_channels (int): Default: 64.
        base_channels (int): Default: 64.
        strides, dilations (Sequence[int]): per stage. Default: D8.
        contract_dilation (bool): Default: True.
        norm_cfg (dict): mmcv norm config. Default: ``dict(type='BN')`` (mmseg's configs use
            ``SyncBN``: same keys; convert with ``nn.SyncBatchNorm.convert_sync_batchnorm``).
        zero_init_residual (bool): start every block's last norm at 0 (identity blocks).
            Default: True (mmseg's default).

    Shape:
        ``[B, 3, H, W]`` -> 4 maps ``[B, base * 2**i * expansion, H_i, W_i]``, ``H_i`` =
        ``ceil(H / 4)`` then divided by the strides.
    """

    arch_settings = {
        18: (BasicBlock, (2, 2, 2, 2)),
        34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3)),
    }

    def __init__(
        self,
        depth: int,
        in_channels: int = 3,
        stem_channels: int = 64,
        base_channels: int = 64,
        strides: Sequence[int] = (1, 2, 1, 1),
        dilations: Sequence[int] = (1, 1, 2, 4),
        contract_dilation: bool = True,
        norm_cfg: Mapping = BN,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        where = "fastctx.models.ResNetV1c"
        if depth not in self.arch_settings:
            raise ValueError(f"{where}: depth must be one of {sorted(self.arch_settings)}, got {depth!r}")
        if len(strides) != 4 or len(dilations) != 4:
            raise ValueError(f"{where}: strides and dilations need 4 entries, got {strides!r}, {dilations!r}")
        self.depth, self.in_channels = depth, in_channels
        block, stage_blocks = self.arch_settings[depth]
        half = stem_channels // 2
        self.stem = nn.Sequential(
            _conv(in_channels, half, 3, 2, 1), _norm(norm_cfg, half, where), nn.ReLU(inplace=True),
            _conv(half, half, 3, 1, 1), _norm(norm_cfg, half, where), nn.ReLU(inplace=True),
            _conv(half, stem_channels, 3, 1, 1), _norm(norm_cfg, stem_channels, where), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem_channels
        self.out_channels: list[int] = []
        for i, num_blocks in enumerate(stage_blocks):
            planes, stride, dilation = base_channels * 2**i, strides[i], dilations[i]
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    _conv(inplanes, planes * block.expansion, 1, stride),
                    _norm(norm_cfg, planes * block.expansion, where),
                )
            first = dilation // 2 if dilation > 1 and contract_dilation else dilation
            layers = [block(inplanes, planes, stride, first, downsample, norm_cfg)]
            inplanes = planes * block.expansion
            layers += [block(inplanes, planes, 1, dilation, None, norm_cfg) for _ in range(1, num_blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            self.out_channels.append(inplanes)
        _init(self, zero_init_residual)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        _check_image("fastctx.models.ResNetV1c", x, self.in_channels)
        x = self.maxpool(self.stem(x))
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return tuple(outs)


# ---- HRNet ---------------------------------------------------------------------------------


def hrnet_extra(width: int) -> dict:
    """mmseg's HRNetV2 ``extra`` config for width ``w`` (``fcn_hr18.py``, ``fcn_hr48``):
    branches of ``w, 2w, 4w, 8w`` channels; stage modules 1, 1, 4, 3; 4 blocks per branch."""
    w = width

    def stage(modules: int, block: str, channels: tuple[int, ...]) -> dict:
        return {"num_modules": modules, "num_branches": len(channels), "block": block,
                "num_blocks": (4,) * len(channels), "num_channels": channels}  # fmt: skip

    return {
        "stage1": stage(1, "BOTTLENECK", (64,)),
        "stage2": stage(1, "BASIC", (w, 2 * w)),
        "stage3": stage(4, "BASIC", (w, 2 * w, 4 * w)),
        "stage4": stage(3, "BASIC", (w, 2 * w, 4 * w, 8 * w)),
    }


HRNET_W18 = hrnet_extra(18)
HRNET_W48 = hrnet_extra(48)
_BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def _downsample(inplanes: int, outplanes: int, stride: int, norm_cfg: Mapping, where: str) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(_conv(inplanes, outplanes, 1, stride), _norm(norm_cfg, outplanes, where))


class _UpsampleLike(nn.Module):
    """mmseg's ``Upsample(scale_factor=s, mode='bilinear', align_corners=False)`` (no parameters)."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        size = [int(t * float(self.scale)) for t in x.shape[-2:]]
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class HRModule(nn.Module):
    """mmseg's ``HRModule``: parallel branches of blocks, then the multi-resolution fusion."""

    def __init__(
        self,
        num_branches: int,
        block: type[nn.Module],
        num_blocks: Sequence[int],
        in_channels: list[int],
        num_channels: Sequence[int],
        multiscale_output: bool,
        norm_cfg: Mapping,
    ) -> None:
        super().__init__()
        where = "fastctx.models.HRNet"
        self.num_branches = num_branches
        branches = []
        for i in range(num_branches):
            out = num_channels[i] * block.expansion
            downsample = _downsample(in_channels[i], out, 1, norm_cfg, where)
            layers = [block(in_channels[i], num_channels[i], 1, 1, downsample, norm_cfg)]
            in_channels[i] = out
            layers += [block(out, num_channels[i], 1, 1, None, norm_cfg) for _ in range(1, num_blocks[i])]
            branches.append(nn.Sequential(*layers))
        self.branches = nn.ModuleList(branches)
        self.fuse_layers = None
        if num_branches > 1:
            fuse_layers = []
            for i in range(num_branches if multiscale_output else 1):
                row: list[nn.Module | None] = []
                for j in range(num_branches):
                    if j > i:
                        row.append(nn.Sequential(
                            _conv(in_channels[j], in_channels[i], 1), _norm(norm_cfg, in_channels[i], where),
                            _UpsampleLike(2 ** (j - i)),
                        ))  # fmt: skip
                    elif j == i:
                        row.append(None)
                    else:
                        downs = []
                        for k in range(i - j):
                            if k == i - j - 1:
                                downs.append(nn.Sequential(
                                    _conv(in_channels[j], in_channels[i], 3, 2, 1), _norm(norm_cfg, in_channels[i], where),
                                ))  # fmt: skip
                            else:
                                downs.append(nn.Sequential(
                                    _conv(in_channels[j], in_channels[j], 3, 2, 1), _norm(norm_cfg, in_channels[j], where),
                                    nn.ReLU(inplace=False),
                                ))  # fmt: skip
                        row.append(nn.Sequential(*downs))
                fuse_layers.append(nn.ModuleList(row))
            self.fuse_layers = nn.ModuleList(fuse_layers)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        x = [branch(t) for branch, t in zip(self.branches, x)]
        if self.fuse_layers is None:
            return x
        fused = []
        for i, row in enumerate(self.fuse_layers):
            y = 0
            for j in range(self.num_branches):
                if j == i:
                    y = y + x[j]
                elif j > i:
                    t = row[j](x[j])
                    if t.shape[2:] != x[i].shape[2:]:
                        t = F.interpolate(t, size=x[i].shape[2:], mode="bilinear", align_corners=False)
                    y = y + t
                else:
                    y = y + row[j](x[j])
            fused.append(self.relu(y))
        return fused


class HRNet(nn.Module):
    """HRNetV2 backbone: mmseg's ``HRNet``, same module names and state-dict keys.

    Stem: two 3x3 stride-2 convs of 64 channels (``conv1``, ``bn1``, ``conv2``, ``bn2``), then
    ``layer1`` (stage 1), ``transition{1,2,3}`` and ``stage{2,3,4}`` (``HRModule`` s).

    Args:
        extra (dict): mmseg's stage config, e.g. :data:`HRNET_W18` / :data:`HRNET_W48`.
        in_channels (int): Default: 3.
        norm_cfg (dict): Default: ``dict(type='BN')``.
        zero_init_residual (bool): Default: False (mmseg's HRNet default).

    Shape:
        ``[B, 3, H, W]`` -> 4 maps ``[B, c_i, H / 2**(i+2), W / 2**(i+2)]`` (channels of
        ``extra['stage4']['num_channels']``).
    """

    def __init__(
        self, extra: Mapping, in_channels: int = 3, norm_cfg: Mapping = BN, zero_init_residual: bool = False
    ) -> None:
        super().__init__()
        where = "fastctx.models.HRNet"
        for s in ("stage1", "stage2", "stage3", "stage4"):
            cfg = extra.get(s) if isinstance(extra, Mapping) else None
            if cfg is None or len(cfg["num_blocks"]) != cfg["num_branches"] or len(cfg["num_channels"]) != cfg["num_branches"]:
                raise ValueError(f"{where}: extra must give {s} with num_branches entries of num_blocks and num_channels")
        self.extra, self.in_channels = extra, in_channels
        self.conv1 = _conv(in_channels, 64, 3, 2, 1)
        self.bn1 = _norm(norm_cfg, 64, where)
        self.conv2 = _conv(64, 64, 3, 2, 1)
        self.bn2 = _norm(norm_cfg, 64, where)
        self.relu = nn.ReLU(inplace=True)
        s1 = extra["stage1"]
        block, planes, n = _BLOCKS[s1["block"]], s1["num_channels"][0], s1["num_blocks"][0]
        self.layer1 = nn.Sequential(
            block(64, planes, 1, 1, _downsample(64, planes * block.expansion, 1, norm_cfg, where), norm_cfg),
            *[block(planes * block.expansion, planes, 1, 1, None, norm_cfg) for _ in range(1, n)],
        )
        pre = [planes * block.expansion]
        for k in (2, 3, 4):
            cfg = extra[f"stage{k}"]
            block = _BLOCKS[cfg["block"]]
            cur = [c * block.expansion for c in cfg["num_channels"]]
            self.add_module(f"transition{k - 1}", self._transition(pre, cur, norm_cfg))
            modules = [
                HRModule(cfg["num_branches"], block, cfg["num_blocks"], cur, cfg["num_channels"], True, norm_cfg)
                for _ in range(cfg["num_modules"])
            ]
            self.add_module(f"stage{k}", nn.Sequential(*modules))
            pre = cur
        self.out_channels = list(pre)
        _init(self, zero_init_residual)

    @staticmethod
    def _transition(pre: list[int], cur: list[int], norm_cfg: Mapping) -> nn.ModuleList:
        where = "fastctx.models.HRNet"
        layers: list[nn.Module | None] = []
        for i, c in enumerate(cur):
            if i < len(pre):
                layers.append(
                    None if c == pre[i] else
                    nn.Sequential(_conv(pre[i], c, 3, 1, 1), _norm(norm_cfg, c, where), nn.ReLU(inplace=True))
                )  # fmt: skip
            else:
                downs = []
                for j in range(i + 1 - len(pre)):
                    cin = pre[-1]
                    cout = c if j == i - len(pre) else cin
                    downs.append(nn.Sequential(_conv(cin, cout, 3, 2, 1), _norm(norm_cfg, cout, where), nn.ReLU(inplace=True)))
                layers.append(nn.Sequential(*downs))
        return nn.ModuleList(layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        _check_image("fastctx.models.HRNet", x, self.in_channels)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        ys = [self.layer1(x)]
        for k in (2, 3, 4):
            transition = getattr(self, f"transition{k - 1}")
            # as mmseg: a branch with a transition takes the lowest-resolution map so far
            xs = [ys[i] if t is None else t(ys[-1]) for i, t in enumerate(transition)]
            ys = getattr(self, f"stage{k}")(xs)
        return ys
