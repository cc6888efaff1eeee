"""ISNet's semantic-level and image-level context (ICCV 2021), with sssegmentation 1.7.0's layout.

Submodule names follow ``ssseg/modules/models/segmentors/isnet/`` and its ``SelfAttentionBlock``
(``correlate_net.{key,query,value,out}_project``, each projection an ``nn.Sequential(conv, norm,
act)`` or a Sequential of two of them, and ``bottleneck`` when ``concat_input``), so an
sssegmentation checkpoint loads unchanged: strip the ``slc_net.`` / ``ilc_net.`` prefix.

:class:`SemanticLevelContext` runs the semantic-level attention reduced to the K class vectors
(OPERATORS.md section 5, "exact reduction"); :class:`ImageLevelContext` runs its dense attention
through ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastctx.nn._common import bare
from fastctx.nn._conv import build_act
from fastctx.ops.ocr import region_attention
from fastctx.ops.semantic import semantic_pool_regions

__all__ = ["ImageLevelContext", "SemanticLevelContext"]

_Ctx = TypeVar("_Ctx", bound=nn.Module)

# sssegmentation's NormalizationBuilder names (the subset that acts on [B, C, H, W] maps).
_NORMS = {"BatchNorm2d": nn.BatchNorm2d, "SyncBatchNorm": nn.SyncBatchNorm, "GroupNorm": nn.GroupNorm}


def _norm(who: str, channels: int, norm_cfg: dict | None) -> nn.Module:
    """sssegmentation's ``BuildNormalization``: ``nn.Identity()`` for None."""
    if norm_cfg is None:
        return nn.Identity()
    if not isinstance(norm_cfg, dict) or "type" not in norm_cfg:
        raise TypeError(f"{who}: norm_cfg must be None or a dict with a 'type', got {norm_cfg!r}")
    kwargs = dict(norm_cfg)
    kind = kwargs.pop("type")
    if kind not in _NORMS:
        raise ValueError(f"{who}: norm_cfg type {kind!r} is not supported; use one of {sorted(_NORMS)}")
    if kind == "GroupNorm":
        return nn.GroupNorm(num_channels=channels, **kwargs)
    return _NORMS[kind](channels, **kwargs)


def _conv_block(who: str, cin: int, cout: int, kernel: int, norm_cfg, act_cfg) -> nn.Sequential:
    """``nn.Sequential(Conv2d(bias=False), BuildNormalization, BuildActivation)``."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=1, padding=kernel // 2, bias=False),
        _norm(who, cout, norm_cfg),
        nn.Identity() if act_cfg is None else build_act(act_cfg, who),
    )


class _SelfAttentionBlock(nn.Module):
    """The parameters of sssegmentation's ``SelfAttentionBlock`` as ISNet builds it
    (``key_query_num_convs=2``, ``value_out_num_convs=1``, norms on, ``with_out_project=True``,
    ``matmul_norm=True``, no sharing, no downsampling); the forward lives in the two modules."""

    def __init__(self, who: str, key_in: int, query_in: int, transform: int, out: int, norm_cfg, act_cfg) -> None:
        super().__init__()
        self.key_project = nn.Sequential(
            _conv_block(who, key_in, transform, 1, norm_cfg, act_cfg),
            _conv_block(who, transform, transform, 1, norm_cfg, act_cfg),
        )
        self.query_project = nn.Sequential(
            _conv_block(who, query_in, transform, 1, norm_cfg, act_cfg),
            _conv_block(who, transform, transform, 1, norm_cfg, act_cfg),
        )
        self.value_project = _conv_block(who, key_in, transform, 1, norm_cfg, act_cfg)
        self.out_project = _conv_block(who, transform, out, 1, norm_cfg, act_cfg)
        self.query_downsample = None
        self.key_downsample = None
        self.matmul_norm = True
        self.transform_channels = transform

    @classmethod
    def from_modules(cls, key_project: nn.Module, query_project: nn.Module, value_project: nn.Module,
                     out_project: nn.Module, transform: int) -> _SelfAttentionBlock:
        """The block around existing projections (the SAME modules: same ``Parameter`` and buffer
        objects); the caller verifies their structure."""
        net = bare(cls)
        net.key_project = key_project
        net.query_project = query_project
        net.value_project = value_project
        net.out_project = out_project
        net.query_downsample = None
        net.key_downsample = None
        net.matmul_norm = True
        net.transform_channels = transform
        return net


def _hold_correlate_net(m: _Ctx, key_project: nn.Module, query_project: nn.Module, value_project: nn.Module,
                        out_project: nn.Module, bottleneck: nn.Module | None, transform_channels: int) -> _Ctx:
    """The shared tail of the context modules' ``from_modules``: ``m.correlate_net`` around the
    projections (the SAME modules), then ``m.bottleneck`` unless it is None; returns ``m``."""
    m.correlate_net = _SelfAttentionBlock.from_modules(
        key_project, query_project, value_project, out_project, transform_channels
    )
    if bottleneck is not None:
        m.bottleneck = bottleneck
    return m


def _check_map(who: str, name: str, t: object, channels: int | None, like: Tensor | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4 or (channels is not None and t.shape[1] != channels):
        want = f"[B, {channels}, H, W]" if channels is not None else "[B, C, H, W]"
        raise ValueError(f"{who}: {name} must be {want}, got {tuple(t.shape)}")
    if like is not None and t.shape != like.shape:
        raise ValueError(f"{who}: {name} must have the shape of x {tuple(like.shape)}, got {tuple(t.shape)}")


# ---- the semantic-level attention over the K class vectors -----------------------------------

def _blocks(project: nn.Sequential) -> list[nn.Sequential]:
    """The (conv, norm, act) blocks of a projection: one block, or a Sequential of blocks."""
    return [project] if isinstance(project[0], nn.Conv2d) else list(project)


def _countable(norm: nn.Module) -> bool:
    """Whether ``norm`` can run on one vector per class with its statistics weighted by the pixel
    counts. True for Identity and BatchNorm (SyncBatchNorm too, except while training under an
    initialised process group, where its statistics are all-reduced across processes)."""
    if isinstance(norm, nn.Identity) or type(norm) is nn.BatchNorm2d:
        return True
    if isinstance(norm, nn.SyncBatchNorm):
        return not (norm.training and dist.is_available() and dist.is_initialized())
    return False


def _counted_batch_norm(norm: nn.modules.batchnorm._BatchNorm, y: Tensor, w: Tensor, total: int) -> Tensor:
    """``norm`` applied to a map in which class ``k`` of image ``b`` covers ``w[b, 0, k]`` pixels
    with the value ``y[b, :, k]`` (``total`` pixels in all), from the ``[B, C, K]`` vectors alone.

    Same result, gradients and running-statistics update as ``norm`` on the full map: the batch
    mean and (biased) variance are the count-weighted ones over the ``total`` pixels, the running
    variance takes the unbiased ``var * total / (total - 1)``; ``num_batches_tracked`` and
    ``momentum=None`` (cumulative average) as ``_BatchNorm.forward``. ``total > 1``: a 1-pixel
    map has already been refused by the query projection's BatchNorm, as in the original.
    """
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    use_batch = norm.training or (norm.running_mean is None and norm.running_var is None)
    if not use_batch:
        return F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
    mean = (y * w).sum((0, 2)) / total  # [C]
    d = y - mean[:, None]  # [B, C, K]
    var = (d * d * w).sum((0, 2)) / total  # [C], biased
    if norm.training and norm.running_mean is not None:
        with torch.no_grad():
            norm.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            norm.running_var.mul_(1 - factor).add_(var.detach() * (total / (total - 1)), alpha=factor)
    out = d * torch.rsqrt(var + norm.eps)[:, None]
    if norm.weight is not None:
        out = out * norm.weight[:, None] + norm.bias[:, None]
    return out


def _project_counted(project: nn.Sequential, r: Tensor, w: Tensor, total: int) -> Tensor:
    """A pointwise projection of the pooled map, on its ``[B, C, K]`` class vectors."""
    for conv, norm, act in _blocks(project):
        r = conv(r.unsqueeze(3)).squeeze(3)
        if not isinstance(norm, nn.Identity):
            r = _counted_batch_norm(norm, r, w, total)
        r = act(r)
    return r


def _project_full(project: nn.Sequential, pooled: Tensor, rep: Tensor) -> Tensor:
    """The projection on the full pooled map, then one representative pixel per class."""
    p = project(pooled).flatten(2)  # [B, Ct, N]
    return p.gather(2, rep.unsqueeze(1).expand(-1, p.shape[1], -1))  # [B, Ct, K]


class SemanticLevelContext(nn.Module):
    """ISNet's semantic-level context, exact, without the ``N x N`` attention.

    sssegmentation's forward: every pixel's features are replaced by the softmax-weighted mean of
    its argmax class (``pooled``, at most K distinct vectors per image), then a dense attention
    runs with queries ``query_project(x)`` and keys/values ``key_project(pooled)`` /
    ``value_project(pooled)`` over all ``N = H * W`` pixels, then ``out_project``, and with
    ``concat_input`` ``bottleneck(cat([feats_il, context]))``.

    Here the pooling runs as :func:`fastctx.semantic_pool_regions` (regions ``[B, C, K]``, counts,
    labels) and the attention as :func:`fastctx.region_attention` over the K class vectors with
    ``bias = log(counts)`` (``-inf`` for an absent class): a class of ``n`` identical keys weighs
    ``n`` times in the softmax, so the result is the dense one. The key/value projections
    (1x1 conv + norm + activation: pointwise) run on the K vectors; their BatchNorm, where it
    uses batch statistics (training), takes the count-weighted mean and variance over the
    ``B * N`` pixels of the pooled map (the statistics the dense version computes) and updates
    the running statistics as it would (unbiased variance over ``B * N``). With another norm
    (GroupNorm), or SyncBatchNorm training under an initialised process group, the projections
    run on the full pooled map (pointwise, cheap next to the attention) and one representative
    pixel per class is taken: exact by construction.

    The one departure: a class whose logits are ``-inf`` at all of its pixels pools to zeros
    (sssegmentation gives NaN), as :func:`fastctx.semantic_pool`.

    Args:
        feats_channels (int): ``C`` of ``x``.
        transform_channels (int): key/query/value width (256 in ISNet).
        concat_input (bool): add ``bottleneck`` (3x3 conv ``2C -> C`` + norm + act) on
            ``cat([feats_il, context])``. Default: False.
        norm_cfg (dict | None): ``dict(type='BatchNorm2d' | 'SyncBatchNorm' | 'GroupNorm', ...)``
            (sssegmentation's names); None: no norm. Default: None.
        act_cfg (dict | None): ``dict(type='ReLU', inplace=True)`` etc.; None: no activation.
            Default: None.
        backend (str | None): passed to :func:`fastctx.semantic_pool_regions` and
            :func:`fastctx.region_attention`. Default: None.

    Shape:
        ``x [B, C, H, W]``, ``preds [B, K, H, W]`` (class logits), ``feats_il [B, C, H, W]``
        (needed with ``concat_input``) -> ``[B, C, H, W]``.

    Example::

        >>> slc = fastctx.nn.SemanticLevelContext(64, 32, concat_input=True,
        ...     norm_cfg={"type": "BatchNorm2d"}, act_cfg={"type": "ReLU"})
        >>> x = torch.randn(2, 64, 33, 65)
        >>> slc(x, torch.randn(2, 19, 33, 65), torch.randn(2, 64, 33, 65)).shape
        torch.Size([2, 64, 33, 65])
    """

    def __init__(
        self,
        feats_channels: int,
        transform_channels: int,
        concat_input: bool = False,
        norm_cfg: dict | None = None,
        act_cfg: dict | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        who = "fastctx.nn.SemanticLevelContext"
        self.feats_channels = feats_channels
        self.backend = backend
        self.correlate_net = _SelfAttentionBlock(
            who, feats_channels, feats_channels, transform_channels, feats_channels, norm_cfg, act_cfg
        )
        if concat_input:
            self.bottleneck = _conv_block(who, feats_channels * 2, feats_channels, 3, norm_cfg, act_cfg)

    @classmethod
    def from_modules(
        cls,
        key_project: nn.Module,
        query_project: nn.Module,
        value_project: nn.Module,
        out_project: nn.Module,
        bottleneck: nn.Module | None,
        feats_channels: int,
        transform_channels: int,
        backend: str | None = None,
    ) -> SemanticLevelContext:
        """A SemanticLevelContext around existing modules (the SAME modules, so the same
        ``Parameter`` and buffer objects): :func:`fastctx.swap` builds one from sssegmentation's
        ``SemanticLevelContext`` (its ``correlate_net`` projections and ``bottleneck``, None
        without ``concat_input``). The projections must be blocks ``nn.Sequential(1x1 conv, norm,
        act)`` (key/query: a Sequential of two) as sssegmentation builds them, with ``key_project``
        / ``value_project`` ``C -> transform_channels``, pixelwise activations and a norm that is
        Identity, BatchNorm2d, SyncBatchNorm or GroupNorm (the caller verifies it)."""
        m = bare(cls)
        m.feats_channels = feats_channels
        m.backend = backend
        return _hold_correlate_net(m, key_project, query_project, value_project, out_project, bottleneck,
                                   transform_channels)

    def forward(self, x: Tensor, preds: Tensor, feats_il: Tensor | None = None) -> Tensor:
        who = "fastctx.nn.SemanticLevelContext"
        _check_map(who, "x", x, self.feats_channels)
        _check_map(who, "preds", preds, None)
        if hasattr(self, "bottleneck"):
            if feats_il is None:
                raise ValueError(f"{who}: concat_input=True needs feats_il [B, C, H, W] (the image-level context)")
            _check_map(who, "feats_il", feats_il, self.feats_channels, like=x)
        net = self.correlate_net
        regions, counts, labels = semantic_pool_regions(x, preds, backend=self.backend)  # [B, C, K]
        query = net.query_project(x)  # [B, Ct, H, W]
        norms = [block[1] for p in (net.key_project, net.value_project) for block in _blocks(p)]
        if all(_countable(n) for n in norms):
            w = counts.to(regions.dtype).unsqueeze(1)  # [B, 1, K]
            key = _project_counted(net.key_project, regions, w, labels.numel())
            value = _project_counted(net.value_project, regions, w, labels.numel())
        else:
            B, C, K = regions.shape
            lab = labels.flatten(1)  # [B, N]
            pooled = regions.gather(2, lab.unsqueeze(1).expand(B, C, -1)).view_as(x)
            N = lab.shape[1]
            pixel = torch.arange(N, device=lab.device).expand(B, N)
            rep = lab.new_full((B, K), N).scatter_reduce(1, lab, pixel, "amin").clamp_max(N - 1)  # [B, K]
            key = _project_full(net.key_project, pooled, rep)
            value = _project_full(net.value_project, pooled, rep)
        bias = counts.to(query.dtype).log()  # [B, K], -inf for an absent class
        context = region_attention(
            query, key, value, scale=net.transform_channels**-0.5, bias=bias, backend=self.backend
        )
        context = net.out_project(context)
        if hasattr(self, "bottleneck"):
            context = self.bottleneck(torch.cat([feats_il, context], dim=1))
        return context

    def extra_repr(self) -> str:
        return f"feats_channels={self.feats_channels}, backend={self.backend!r}"


class ImageLevelContext(nn.Module):
    """ISNet's image-level context (sssegmentation's forward), its dense attention through
    ``torch.nn.functional.scaled_dot_product_attention``.

    ``key_feats = cat([bilinear(global_avgpool(x)), x])``; queries ``query_project(x)``,
    keys/values ``key_project`` / ``value_project`` of ``key_feats``, softmax attention over all
    ``N`` pixels with scale ``transform_channels ** -0.5``, ``out_project``, and with
    ``concat_input`` ``bottleneck(cat([x, context]))``. No fastctx op runs here, so there is no
    ``backend`` argument.

    Args:
        feats_channels (int): ``C`` of ``x``.
        transform_channels (int): key/query/value width.
        concat_input (bool): Default: False.
        align_corners (bool): of the bilinear upsampling of the global average. Default: False.
        norm_cfg, act_cfg (dict | None): as :class:`SemanticLevelContext`. Default: None.

    Shape:
        ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def __init__(
        self,
        feats_channels: int,
        transform_channels: int,
        concat_input: bool = False,
        align_corners: bool = False,
        norm_cfg: dict | None = None,
        act_cfg: dict | None = None,
    ) -> None:
        super().__init__()
        who = "fastctx.nn.ImageLevelContext"
        self.feats_channels = feats_channels
        self.align_corners = align_corners
        self.global_avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.correlate_net = _SelfAttentionBlock(
            who, feats_channels * 2, feats_channels, transform_channels, feats_channels, norm_cfg, act_cfg
        )
        if concat_input:
            self.bottleneck = _conv_block(who, feats_channels * 2, feats_channels, 3, norm_cfg, act_cfg)

    @classmethod
    def from_modules(
        cls,
        global_avgpool: nn.Module,
        key_project: nn.Module,
        query_project: nn.Module,
        value_project: nn.Module,
        out_project: nn.Module,
        bottleneck: nn.Module | None,
        feats_channels: int,
        transform_channels: int,
        align_corners: bool = False,
    ) -> ImageLevelContext:
        """An ImageLevelContext around existing modules (the SAME modules): :func:`fastctx.swap`
        builds one from sssegmentation's ``ImageLevelContext`` (its ``global_avgpool``, an
        ``AdaptiveAvgPool2d((1, 1))``, its ``correlate_net`` projections, ``key_project`` /
        ``value_project`` taking ``2 * feats_channels``, and ``bottleneck``, None without
        ``concat_input``; the caller verifies them)."""
        m = bare(cls)
        m.feats_channels = feats_channels
        m.align_corners = align_corners
        m.global_avgpool = global_avgpool
        return _hold_correlate_net(m, key_project, query_project, value_project, out_project, bottleneck,
                                   transform_channels)

    def forward(self, x: Tensor) -> Tensor:
        _check_map("fastctx.nn.ImageLevelContext", "x", x, self.feats_channels)
        B, _, H, W = x.shape
        net = self.correlate_net
        x_global = F.interpolate(self.global_avgpool(x), size=(H, W), mode="bilinear", align_corners=self.align_corners)
        key_feats = torch.cat([x_global, x], dim=1)

        def heads(t: Tensor) -> Tensor:  # [B, Ct, H, W] -> [B, 1, N, Ct], channels stride 1
            # SDPA's fused kernels need a last-dim stride of 1 (on CPU, measured: with the
            # transposed view it fell back to the math path and kept the N x N weights, 1.18 GB
            # at 64x128, B=2, against 66 MB; 2.3x slower forward)
            return t.flatten(2).transpose(1, 2).contiguous().unsqueeze(1)

        query = heads(net.query_project(x))
        key = heads(net.key_project(key_feats))
        value = heads(net.value_project(key_feats))
        context = F.scaled_dot_product_attention(query, key, value, scale=net.transform_channels**-0.5)
        context = context.squeeze(1).transpose(1, 2).reshape(B, -1, H, W)
        context = net.out_project(context)
        if hasattr(self, "bottleneck"):
            context = self.bottleneck(torch.cat([x, context], dim=1))
        return context

    def extra_repr(self) -> str:
        return f"feats_channels={self.feats_channels}, align_corners={self.align_corners}"
