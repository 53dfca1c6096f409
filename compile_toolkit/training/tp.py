"""Tensor parallel training (``parallelize_module``) on a 2-D mesh ``DATAxMODEL`` of torchrun workers.

The ``model`` axis splits layers Megatron-style: of two linear layers in a row (with only
elementwise operations between them, as in an MLP) the first is column parallel (its output
features, and rows of its weight, split over the axis) and the second row parallel (its input
features split; its partial outputs are summed), so the hidden activation between them is never
gathered and the pair's output is whole again on every rank. Two convolutions in a row split
the same way by channels, with the batch norms between them split by channel (:mod:`.tp_conv`).
The pairs are found in the model's ``torch.fx`` graph, or for a ``transformers`` model taken from
its own declared plan (attention split by heads and key/value groups, gated MLPs); every other
layer stays replicated, and the log says which. ``--tp-plan file.json`` (``{module name:
"colwise" | "rowwise" | "channelwise"}``) replaces the derived plan.

The ``data`` axis splits the global batch; with more than one rank on it, FSDP2 shards every
parameter along it too (2-D: a weight is split by tensor parallelism on ``model`` and by FSDP on
``data``), and averages the gradients over it. Ranks with the same ``data`` coordinate read the
same samples. Masks: :mod:`.sharded`.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

from ..errors import CtkError
from .config import TrainConfig
from .fsdp import shard, without_gradient_sync
from .mesh import MeshShape, parse_mesh
from .sharded import ShardedStrategy
from .tp_plan import derive_plan, parallel_styles, read_plan


class TpStrategy(ShardedStrategy):
    """This torchrun worker's place on the ``data`` x ``model`` mesh."""

    name = "tp"

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        shape = tp_mesh(config.mesh, self.world_size, "torchrun started")
        self.shape = shape
        self.mesh: DeviceMesh = init_device_mesh(self.device.type, (shape.data, shape.model),
                                                 mesh_dim_names=("data", "model"))
        self.plan_file = config.tp_plan
        self.plan: dict[str, str] = {}
        self.replicated: list[str] = []
        self.fsdp = shape.data > 1

    @property
    def data_rank(self) -> int:
        return self.mesh["data"].get_local_rank()

    @property
    def data_size(self) -> int:
        return self.shape.data

    def split(self, model: nn.Module) -> None:
        size = self.shape.model
        self.plan = read_plan(self.plan_file, model, size) if self.plan_file else derive_plan(model, size)
        self.replicated = [name for name, module in model.named_modules()
                           if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and name not in self.plan]
        if self.rank == 0 and self.replicated:
            print(f"ctk: tp: {len(self.replicated)} layer(s) left replicated on the model axis (no column/row "
                  f"pair{' in --tp-plan' if self.plan_file else ''}): {', '.join(self.replicated)}",
                  file=sys.stderr, flush=True)
        if self.plan:
            parallelize_module(model, self.mesh["model"], parallel_styles(model, self.plan))
            _check_split(model, self.plan)
        if self.fsdp:
            shard(model, self.mesh["data"], {})
        model.to(self.device)  # what neither split: the replicated layers and the buffers

    def no_sync(self, trained: nn.Module) -> contextlib.AbstractContextManager:
        return without_gradient_sync(trained) if self.fsdp else contextlib.nullcontext()

    def meta(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "mesh": str(self.shape)}

    def log_meta(self, model: nn.Module) -> dict[str, Any]:
        return {**super().log_meta(model), "tp_plan": self.plan, "replicated": self.replicated}


def tp_mesh(mesh: str, processes: int, started: str) -> MeshShape:
    """The ``--mesh`` of ``processes`` tp ranks (``1x1``: all of them on the model axis); the error
    says what ``started`` them (the launcher checks before its workers start, a worker after)."""
    shape = parse_mesh(mesh)
    if (shape.data, shape.model) == (1, 1):
        return MeshShape(1, processes)
    if shape.devices != processes:
        raise CtkError(f"--mesh {shape} needs {shape.devices} processes, {started} {processes}")
    return shape


def _check_split(model: nn.Module, plan: dict[str, str]) -> None:
    """Every layer of the plan holds ``DTensor`` parameters now (a plan that split nothing is a bug, not a run)."""
    whole = [name for name in plan
             if not all(isinstance(p, DTensor) for p in model.get_submodule(name).parameters(recurse=False))]
    if whole:
        raise CtkError(f"tp: the plan left {', '.join(whole)} unsplit")
