"""Multi-process helpers: ``torchrun`` environment, and a SyncBatchNorm that also runs on CPU.

``torch.nn.SyncBatchNorm`` accepts only accelerator tensors, so on CPU (gloo) the batch norms are
replaced by :class:`CPUSyncBatchNorm`, which reduces the per-channel sums across processes with a
differentiable all-reduce. Both keep BatchNorm's state-dict
keys, so checkpoints load into the plain model.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (``(0, 1, 0)`` without)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched with ``WORLD_SIZE > 1``; returns ``(rank, world)``."""
    rank, world, _ = env_world()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllReduceSum(torch.autograd.Function):
    """Sum across processes; the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch across processes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        c = x.shape[1]
        xf = x.float()
        n = torch.tensor([xf.numel() / c], dtype=torch.float32, device=x.device)
        s = all_reduce(torch.cat([xf.sum((0, 2, 3)), n]))
        count = s[c]
        mean = s[:c] / count
        var = all_reduce((xf - mean.view(1, c, 1, 1)).square().sum((0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (count / (count - 1)), alpha=m)
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``nn.SyncBatchNorm`` on CUDA; :class:`CPUSyncBatchNorm` for every BatchNorm2d on CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CPUSyncBatchNorm):
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum across processes (a CPU tensor goes through the GPU under NCCL)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            g = t.cuda()
            dist.all_reduce(g)
            t.copy_(g.cpu())
        else:
            dist.all_reduce(t)
    return t
