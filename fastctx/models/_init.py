"""Weights for parity checks (tests/test_models.py, fastctx/bench/cases_models.py)."""

from __future__ import annotations

import torch
from torch import nn

from fastctx.nn import Scale


def randomize_for_parity(model: nn.Module, scale: float = 0.8) -> None:
    """Weights under which every branch reaches the output, so that a fused-vs-reference
    comparison sees every op: mmseg/mmcv start some parameters at 0 (criss-cross ``gamma``, ANN's
    ``out_project``, the residual blocks' last BatchNorm weight), where a comparison could not fail.

    In place, from torch's global generator: the BatchNorm affine from U(0.5, 1.5) / N(0, 0.2) and
    its running statistics from N(0, 0.2) / U(0.5, 1.5); every :class:`fastctx.nn.Scale` set to
    ``scale``; then every parameter still all zero drawn from N(0, 0.1).
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)
                if m.running_mean is not None:
                    m.running_mean.normal_(0, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, Scale):
                m.scale.fill_(scale)
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
