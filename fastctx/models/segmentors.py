"""Segmentors: a backbone, a decode head (or mmseg's cascade of two) and an auxiliary head, with
mmsegmentation's top-level names ``backbone.*``, ``decode_head.*`` (``decode_head.{0,1}.*`` for a
cascade) and ``auxiliary_head.*``."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fastctx.backends import BACKENDS

__all__ = ["CascadeEncoderDecoder", "EncoderDecoder", "Segmentor", "load_backbone"]


def _check_backend(backend: object, where: str) -> str | None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{where}: backend must be None or one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


class Segmentor(nn.Module):
    """Common base: the ``backend`` of every fastctx op in the model, and the output dict.

    ``model(img)`` with ``img`` ``[B, 3, H, W]`` (normalised as the trainer does) returns
    ``{"out": logits [B, K, h, w]}`` in eval mode; in training mode also ``"aux"`` (the auxiliary
    FCN head, loss weight 0.4 in mmseg's configs) and any extra prediction the model's config puts
    a loss on (ISNet: ``"stage1"``). Logits are at the head's resolution (1/8 of the image for the
    D8 ResNets, 1/4 for HRNet); resize them to the label size (bilinear, ``align_corners=False``).
    """

    #: set by :func:`fastctx.models.build`: the registry name and K (None when built by hand)
    name: str | None = None
    num_classes: int | None = None

    def __init__(self, backend: str | None) -> None:
        super().__init__()
        self._backend = _check_backend(backend, f"fastctx.models.{type(self).__name__}")

    @property
    def backend(self) -> str | None:
        """The backend of every fastctx op in the model. Setting it sets the ``backend`` attribute
        of every submodule that has one (the fastctx.nn modules and heads), so the same weights run
        on another backend: ``model.backend = "reference"``."""
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self._backend = _check_backend(value, f"fastctx.models.{type(self).__name__}.backend")
        self._apply_backend()

    def _apply_backend(self) -> None:
        for m in self.modules():
            if m is not self and "backend" in vars(m):
                m.backend = self._backend

    def _check(self, img: object) -> None:
        where = f"fastctx.models.{type(self).__name__}"
        if not isinstance(img, Tensor):
            raise TypeError(f"{where}: img must be a torch.Tensor, got {type(img).__name__}")
        if img.dim() != 4 or img.shape[1] != 3 or img.numel() == 0:
            raise ValueError(f"{where}: img must be a non-empty [B, 3, H, W] batch, got {tuple(img.shape)}")
        if not img.is_floating_point():
            raise TypeError(f"{where}: img must be floating point, got {img.dtype}")


class EncoderDecoder(Segmentor):
    """mmseg's ``EncoderDecoder``: ``backbone``, ``decode_head``, ``auxiliary_head`` (optional).
    A decode head may return a dict (``{"out": ..., extra predictions}``) instead of a tensor."""

    def __init__(
        self, backbone: nn.Module, decode_head: nn.Module, auxiliary_head: nn.Module | None = None,
        backend: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(backend)
        self.backbone = backbone
        self.decode_head = decode_head
        if auxiliary_head is not None:
            self.auxiliary_head = auxiliary_head
        self._apply_backend()

    def forward(self, img: Tensor) -> dict[str, Tensor]:
        self._check(img)
        feats = self.backbone(img)
        out = self.decode_head(feats)
        result = dict(out) if isinstance(out, Mapping) else {"out": out}
        if not self.training:
            return {"out": result["out"]}
        if hasattr(self, "auxiliary_head"):
            result["aux"] = self.auxiliary_head(feats)
        return result


class CascadeEncoderDecoder(Segmentor):
    """mmseg's ``CascadeEncoderDecoder`` with two stages (OCRNet): ``decode_head.0`` (an FCN head:
    its logits are the training output ``"aux"``, loss weight 0.4 in mmseg's configs) and
    ``decode_head.1`` (the OCR head, taking those logits: ``"out"``)."""

    def __init__(self, backbone: nn.Module, first: nn.Module, second: nn.Module, backend: str | None = None) -> None:
        super().__init__(backend)
        self.backbone = backbone
        self.decode_head = nn.ModuleList([first, second])
        self._apply_backend()

    def forward(self, img: Tensor) -> dict[str, Tensor]:
        self._check(img)
        feats = self.backbone(img)
        prev = self.decode_head[0](feats)
        out = self.decode_head[1](feats, prev)
        return {"out": out, "aux": prev} if self.training else {"out": out}


# Keys of the classification heads that ImageNet backbone checkpoints carry (open-mmlab's
# resnet*_v1c: ``fc.*``; msra hrnetv2: ``incre_modules``, ``downsamp_modules``, ``final_layer``,
# ``classifier``); they have no place in a segmentation backbone.
_CLASSIFIER_PREFIXES = ("fc.", "head.", "incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


def load_backbone(backbone: nn.Module, source: str | os.PathLike | Mapping[str, Tensor]) -> None:
    """Load a backbone checkpoint the user has on disk (never downloads).

    ``source``: a path to a ``torch.save`` file, or a state dict. Accepted layouts: a plain state
    dict or one under ``"state_dict"`` / ``"model"``; keys of the backbone itself
    (open-mmlab / mmseg ``open-mmlab://resnet50_v1c``, ``msra/hrnetv2_w18``) or prefixed
    ``backbone.`` (mmpretrain classifiers, mmseg segmentors: only those entries are taken).
    Classification-head entries (``fc.*``, ``incre_modules.*`` ...) are dropped; everything else
    must match the backbone exactly (strict), or a ValueError names the file and the keys.
    """
    where = "fastctx.models.load_backbone"
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the given state dict"
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ValueError(f"{where}: no checkpoint file at {name!r}")
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (re-raised with the file named)
            raise ValueError(f"{where}: cannot read {name!r} as a torch checkpoint: {e}") from e
    else:
        state = source
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{where}: {name!r} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        raise ValueError(
            f"{where}: {name!r} does not match {type(backbone).__name__}: "
            f"missing {len(missing)} [{few(missing)}], unexpected {len(unexpected)} [{few(unexpected)}], "
            f"shape mismatch {len(wrong)} [{few(wrong)}]"
        )
    backbone.load_state_dict(state, strict=True)
