"""Tensor parallel convolutions: Megatron's column/row split, by channels.

Of two convolutions in a row with only per-channel operations between them (batch norm, an
activation, pooling), the first is split by output channels (``Shard(0)`` of its weight and bias:
each rank computes its channels from the whole input) and the second by input channels
(``Shard(1)`` of its weight: each rank's partial sum over its channels, all-reduced, plus the
whole bias), so the activation between them is never gathered: a batch norm there holds and
updates the statistics of its own channels (``Shard(0)`` of its weight, bias and running stats).

DTensor's convolution rule assumes a replicated weight (it splits the batch, not the channels),
so these styles keep every parameter a ``DTensor`` with the placements above (the masks,
optimizer state and DCP checkpoints of :mod:`.sharded` follow them) but run the layer's own
``forward`` on the local shards (``to_local()``, autograd-aware: a shard's gradient lands on its
``DTensor``). The activations between modules are plain local tensors, as under torch's
``ColwiseParallel``/``RowwiseParallel``. Two collectives, both through DTensor so autograd sees
them: the input gradient of an output-channel split is summed over the model axis (each rank
saw only its channels' share), and the output of an input-channel split is.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..errors import CtkError

Forward = Callable[[torch.Tensor], torch.Tensor]


def splittable_conv(module: nn.Module) -> bool:
    """A convolution these styles split: not transposed, one group (grouped and depthwise
    convolutions tie input to output channels, which a split of either alone breaks)."""
    return isinstance(module, _ConvNd) and not module.transposed and module.groups == 1


class _LocalShards(ParallelStyle):
    """Turns the named parameters and buffers of a layer into ``DTensor``\\ s split on ``dim``
    (the others replicated) and runs the layer's class ``forward`` on the local shards."""

    dim = 0
    split: Collection[str] = ()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, param in list(module.named_parameters(recurse=False)):
            placement: Placement = Shard(self.dim) if name in self.split else Replicate()
            value = distribute_tensor(param.data, device_mesh, [placement], src_data_rank=self.src_data_rank)
            module.register_parameter(name, nn.Parameter(value, requires_grad=param.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if name in self.split and buffer is not None:
                module._buffers[name] = distribute_tensor(buffer, device_mesh, [Shard(self.dim)],
                                                          src_data_rank=self.src_data_rank)
        module.forward = self._forward(module, device_mesh)  # type: ignore[method-assign]
        return module

    def _forward(self, module: nn.Module, mesh: DeviceMesh) -> Forward:
        """The ``forward`` that replaces ``module``'s (an attribute of the instance)."""
        def forward(input: torch.Tensor) -> torch.Tensor:
            return run_local(module, input)
        return forward


class ConvColwiseParallel(_LocalShards):
    """A convolution split by output channels; its input is whole on every rank, its output the
    rank's channels."""

    split = ("weight", "bias")

    def _forward(self, module: nn.Module, mesh: DeviceMesh) -> Forward:
        def forward(input: torch.Tensor) -> torch.Tensor:
            return run_local(module, _sum_gradient(input, mesh))
        return forward


class ConvRowwiseParallel(_LocalShards):
    """A convolution split by input channels; its input is the rank's channels, its output (the
    partial sums all-reduced, then the bias) whole on every rank."""

    dim = 1
    split = ("weight",)

    def _forward(self, module: nn.Module, mesh: DeviceMesh) -> Forward:
        def forward(input: torch.Tensor) -> torch.Tensor:
            partial = run_local(module, input, without=("bias",))
            out = DTensor.from_local(partial, mesh, [Partial()], run_check=False)
            out = out.redistribute(mesh, [Replicate()]).to_local()
            bias = module.bias
            if bias is None:
                return out
            return out + _local(bias).reshape(-1, *[1] * (out.dim() - 2))
        return forward


class ChannelParallel(_LocalShards):
    """A batch norm between the two convolutions: its weight, bias and running statistics split by
    channel, each rank normalising its own channels."""

    split = ("weight", "bias", "running_mean", "running_var")


def run_local(module: nn.Module, input: torch.Tensor, without: Collection[str] = ()) -> torch.Tensor:
    """``module``'s class ``forward`` on ``input`` with each ``DTensor`` parameter and buffer
    replaced by its local shard (the parameters named in ``without`` by None) for the call."""
    params, buffers = dict(module._parameters), dict(module._buffers)
    try:
        for name, param in params.items():
            module._parameters[name] = None if name in without else _local(param)  # type: ignore[assignment]
        for name, buffer in buffers.items():
            module._buffers[name] = _local(buffer)
        return type(module).forward(module, input)
    finally:
        module._parameters.update(params)
        module._buffers.update(buffers)


def _local(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The local shard (a view: a running statistic updated in it is updated in the ``DTensor``)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _sum_gradient(input: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """``input`` as is, whose gradient is summed over ``mesh`` in the backward pass: every rank's
    gradient covers only the output channels it computed."""
    whole = DTensor.from_local(input, mesh, [Replicate()], run_check=False)
    return whole.to_local(grad_placements=[Partial()])


def check_conv_entry(name: str, module: nn.Module, style: str, size: int, option: str) -> None:
    """One line naming the layer when ``style`` cannot split it over ``size`` ranks."""
    if isinstance(module, _ConvNd):
        if module.transposed or module.groups != 1:
            what = "transposed" if module.transposed else f"grouped (groups={module.groups})"
            raise CtkError(f"{option}: module {name!r} is a {what} {type(module).__name__}; only convolutions of "
                           "one group split by channels")
        channels = module.out_channels if style == "colwise" else module.in_channels
        side = "output " if style == "colwise" else "input "
    elif isinstance(module, _BatchNorm):
        channels, side = module.num_features, ""
    else:
        return
    if channels % size:
        raise CtkError(f"{option}: module {name!r} has {channels} {side}channels, not divisible by the {size} "
                       "ranks of the model axis")
