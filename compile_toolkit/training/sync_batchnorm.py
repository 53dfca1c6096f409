"""Batch norm over the global batch on CPU (gloo), where ``torch.nn.SyncBatchNorm`` refuses to run.

Under DDP each rank normalises with the statistics of its own share of the batch, so a model with
batch norm trains differently from one process on the whole batch. SyncBatchNorm fixes that by
summing the statistics over ranks, but PyTorch's implementation is CUDA-only. This module does the
same with plain tensor ops and an autograd-aware all-reduce (whose backward all-reduces the
gradient), so gradients also flow through the other ranks' statistics exactly as in one process.
The sums are taken in float64: ``E[x^2] - E[x]^2`` in float32 loses digits that one process's
batch norm keeps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import CtkError

PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class GlooSyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics cover the batch of every rank (any device, any backend).

    ``after`` holds what a fused norm-and-activation layer (timm's ``BatchNormAct2d``: ``drop``
    then ``act``) applies to the normalised output, so converting it keeps the activation."""

    def __init__(self, *args: object, after: tuple[tuple[str, nn.Module], ...] = (), **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.after = [name for name, _ in after]
        for name, module in after:
            self.add_module(name, module)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self._normalise(input)
        for name in self.after:
            out = getattr(self, name)(out)
        return out

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _normalise(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        wide = input.double()
        local = torch.cat([wide.sum(dims), (wide * wide).sum(dims), wide.new_tensor([input.numel() // channels])])
        total = dist_nn.all_reduce(local)
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels : 2 * channels] / count - mean * mean
        shape = [1, channels] + [1] * (input.dim() - 2)
        scale = torch.rsqrt(var + self.eps).to(input.dtype)
        out = (input - mean.to(input.dtype).view(shape)) * scale.view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """The same update as ``F.batch_norm``: running variance is unbiased over the global batch."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1)
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d in ``module`` by a :class:`GlooSyncBatchNorm` sharing its
    parameters and buffers (state-dict names unchanged, so checkpoints load into the plain model).

    A batch norm subclass that does more than normalise would silently lose it: timm's fused
    norm-and-activation (``drop`` then ``act``) keeps both; any other subclass is refused by name."""
    if isinstance(module, _BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        converted = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            after=_fused_after(module),
        )
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        if module.track_running_stats:
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module


def _fused_after(norm: _BatchNorm) -> tuple[tuple[str, nn.Module], ...]:
    if type(norm) in PLAIN_NORMS:
        return ()
    if type(norm).__name__ == "BatchNormAct2d" and isinstance(getattr(norm, "act", None), nn.Module) \
            and isinstance(getattr(norm, "drop", None), nn.Module):
        return (("drop", norm.drop), ("act", norm.act))
    raise CtkError(f"--sync-batchnorm cannot convert {type(norm).__module__}.{type(norm).__name__}: it is a batch norm "
                   "subclass whose extra behaviour would be lost; train without --sync-batchnorm")
