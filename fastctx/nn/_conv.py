"""mmcv's ``ConvModule`` (conv -> norm -> activation) as the toolbox modules use it: a minimal
stand-in with the same state-dict keys, the same ``conv_cfg`` / ``norm_cfg`` / ``act_cfg`` dicts
and the same initialisation, so checkpoints of mmseg / sssegmentation heads load. fastctx never
imports mmcv."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

__all__ = ["BN", "RELU", "ConvModule", "build_act", "build_norm"]

#: mmseg's configs use ``SyncBN``; ``BN`` gives the same state-dict keys.
BN: Mapping = {"type": "BN"}
RELU: Mapping = {"type": "ReLU"}

# mmcv's registry names -> (torch class, state-dict name of the norm as mmcv's infer_abbr gives it)
_NORMS: dict[str, tuple[type[nn.Module], str]] = {
    "BN": (nn.BatchNorm2d, "bn"),
    "BN2d": (nn.BatchNorm2d, "bn"),
    "SyncBN": (nn.SyncBatchNorm, "bn"),
    "GN": (nn.GroupNorm, "gn"),
    "IN": (nn.InstanceNorm2d, "in"),
    "IN2d": (nn.InstanceNorm2d, "in"),
}
_ACTS: dict[str, type[nn.Module]] = {
    "ReLU": nn.ReLU,
    "LeakyReLU": nn.LeakyReLU,
    "PReLU": nn.PReLU,
    "ReLU6": nn.ReLU6,
    "ELU": nn.ELU,
    "Sigmoid": nn.Sigmoid,
    "Tanh": nn.Tanh,
    "GELU": nn.GELU,
    "SiLU": nn.SiLU,
}
_NO_INPLACE = ("Tanh", "PReLU", "Sigmoid", "GELU")  # mmcv's list, of the types above


def _cfg(where: str, what: str, cfg: object, known: Mapping) -> dict | None:
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise TypeError(f"{where}: {what} must be None or a dict with a 'type', got {cfg!r}")
    if cfg["type"] not in known:
        raise ValueError(f"{where}: {what} type {cfg['type']!r} is not supported; use one of {', '.join(known)}")
    return dict(cfg)


def build_norm(cfg: Mapping, num_features: int, where: str) -> tuple[str, nn.Module]:
    """mmcv's ``build_norm_layer`` for the types of ``_NORMS``: ``(name, layer)``."""
    cfg = _cfg(where, "norm_cfg", cfg, _NORMS)
    cls, name = _NORMS[cfg.pop("type")]
    requires_grad = cfg.pop("requires_grad", True)
    cfg.setdefault("eps", 1e-5)
    if cls is nn.GroupNorm:
        if "num_groups" not in cfg:
            raise ValueError(f"{where}: a GN norm_cfg needs 'num_groups'")
        layer = cls(num_channels=num_features, **cfg)
    else:
        layer = cls(num_features, **cfg)
    for p in layer.parameters():
        p.requires_grad = requires_grad
    return name, layer


def build_act(cfg: Mapping, where: str) -> nn.Module:
    """mmcv's ``build_activation_layer`` as ``ConvModule`` calls it (``inplace=True`` by default)."""
    cfg = _cfg(where, "act_cfg", cfg, _ACTS)
    kind = cfg.pop("type")
    if kind not in _NO_INPLACE:
        cfg.setdefault("inplace", True)
    return _ACTS[kind](**cfg)


def _check_conv_cfg(cfg: object, where: str) -> None:
    if cfg is not None and not (isinstance(cfg, Mapping) and cfg.get("type") in ("Conv", "Conv2d") and len(cfg) == 1):
        raise ValueError(f"{where}: only conv_cfg=None or dict(type='Conv2d') is supported, got {cfg!r}")


class ConvModule(nn.Module):
    """conv -> norm -> activation, with mmcv ``ConvModule``'s state-dict keys and init.

    Keys: ``conv.weight`` (+ ``conv.bias`` when there is no norm, mmcv's ``bias='auto'``),
    ``bn.*`` / ``gn.*`` / ``in.*`` for the norm, ``activate.*`` (PReLU only). Conv weights are
    kaiming-normal (fan_out), norms start at weight 1, bias 0, as mmcv initialises them.

    Args:
        in_channels (int), out_channels (int), kernel_size (int), padding (int): of the conv.
        conv_cfg (dict | None): None or ``dict(type='Conv2d')``. Default: None.
        norm_cfg (dict | None): mmcv norm config (``BN``, ``SyncBN``, ``GN``, ``IN``). Default: None.
        act_cfg (dict | None): mmcv activation config. Default: ``dict(type='ReLU')``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        padding: int = 0,
        conv_cfg: Mapping | None = None,
        norm_cfg: Mapping | None = None,
        act_cfg: Mapping | None = RELU,
    ) -> None:
        super().__init__()
        where = "fastctx.nn.ConvModule"
        _check_conv_cfg(conv_cfg, where)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=norm_cfg is None)
        self.with_norm, self.with_activation = norm_cfg is not None, act_cfg is not None  # as mmcv
        self.norm_name = None
        if norm_cfg is not None:
            self.norm_name, norm = build_norm(norm_cfg, out_channels, where)
            self.add_module(self.norm_name, norm)
        self.activate = build_act(act_cfg, where) if act_cfg is not None else None
        # mmcv ConvModule.init_weights
        if isinstance(self.activate, nn.LeakyReLU):
            a, nonlinearity = self.activate.negative_slope, "leaky_relu"
        else:
            a, nonlinearity = 0.0, "relu"
        nn.init.kaiming_normal_(self.conv.weight, a=a, mode="fan_out", nonlinearity=nonlinearity)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        norm = self.norm
        if norm is not None and getattr(norm, "weight", None) is not None:
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)

    @property
    def norm(self) -> nn.Module | None:
        return getattr(self, self.norm_name) if self.norm_name else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm_name:
            x = getattr(self, self.norm_name)(x)
        if self.activate is not None:
            x = self.activate(x)
        return x
