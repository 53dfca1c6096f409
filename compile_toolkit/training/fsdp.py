"""Fully sharded data parallel training with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Every rank holds ``1/N`` of each parameter (dim 0, as a ``DTensor`` on a 1-D mesh of all ranks)
and of its optimizer state; FSDP2 all-gathers a block's parameters for its forward and backward
and reduce-scatters the gradients, averaged over the ranks, so a step updates the same weights a
single process updates on the global batch. ``fully_shard`` goes over each block (the layers of a
``ModuleList``, else the root's children that hold parameters) and then the root, which takes the
parameters left over.

``--precision bf16`` adds FSDP2's ``MixedPrecisionPolicy`` (bf16 parameters in forward and backward,
fp32 gradient reduction, fp32 master shards); ``--cpu-offload`` keeps the shards, their gradients
and the optimizer step on the CPU (``CPUOffloadPolicy``). Masks: :mod:`.sharded`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from .config import TrainConfig
from .sharded import ShardedStrategy


class FsdpStrategy(ShardedStrategy):
    """This torchrun worker's shard of every parameter."""

    name = "fsdp"

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        self.mesh: DeviceMesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("data",))
        self.bf16 = config.precision == "bf16"
        self.offload = config.cpu_offload

    def split(self, model: nn.Module) -> None:
        policy = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} \
            if self.bf16 else {}
        if self.offload:
            policy["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")  # pinning needs CUDA
        shard(model, self.mesh, policy)

    def no_sync(self, trained: nn.Module) -> contextlib.AbstractContextManager:
        return without_gradient_sync(trained)

    def meta(self) -> dict:
        return {"world_size": self.world_size, "mesh": f"{self.world_size}x1"}


def shard(model: nn.Module, mesh: DeviceMesh, policy: dict) -> list[str]:
    """``fully_shard`` every block of ``model`` (see :func:`blocks`) and then ``model``; returns the blocks' names.

    Under a bf16 ``mp_policy`` each batch norm is its own unit computing in fp32 (its inputs cast
    up): its running statistics are fp32 buffers, which ``batch_norm`` cannot mix with bf16 weights."""
    names = blocks(model)
    if "mp_policy" in policy:
        fp32 = {**policy, "mp_policy": MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)}
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                fully_shard(module, mesh=mesh, **fp32)
        names = [name for name in names if not isinstance(model.get_submodule(name), nn.modules.batchnorm._BatchNorm)]
    for name in names:
        fully_shard(model.get_submodule(name), mesh=mesh, **policy)
    fully_shard(model, mesh=mesh, **policy)
    return names


def blocks(model: nn.Module) -> list[str]:
    """The units FSDP2 gathers one at a time: every layer of a ``ModuleList`` (a transformer's
    blocks), or when there is none the root's children that hold parameters."""
    listed = [f"{name}.{index}" for name, module in model.named_modules() if isinstance(module, nn.ModuleList)
              for index, _ in enumerate(module)]
    if listed:
        return listed
    return [name for name, child in model.named_children() if any(True for _ in child.parameters())]


@contextlib.contextmanager
def without_gradient_sync(model: nn.Module) -> Iterator[None]:
    """FSDP2's ``set_requires_gradient_sync(False)`` for a micro-batch that is not the last of its step."""
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]
