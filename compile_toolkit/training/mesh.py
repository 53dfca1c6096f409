"""The SPMD device mesh and where each parameter lives on it.

A mesh ``DATAxMODEL`` arranges the devices in a grid: the batch is split along ``data`` (data
parallelism) and layer weights along ``model`` (tensor parallelism). The XLA SPMD partitioner
(GSPMD) inserts every collective the annotations imply, so any sharding computes the same
numbers; the rules here only decide what is cheap:

- a convolution is split by output channels (each device computes some feature maps);
- linear layers are split Megatron-style, in pairs: the first of two consecutive layers by output
  features ("column parallel"), the next one, which consumes them, by input features ("row
  parallel"), so the hidden activation between them never has to be gathered;
- ``nn.MultiheadAttention`` is split by heads (rows of the fused q/k/v projection) and its output
  projection by input features;
- a dimension that the ``model`` axis does not divide, and everything else (norms, embeddings), is
  replicated.

With FSDPv2 the data axis is named ``fsdp`` (the name torch_xla's
``SpmdFullyShardedDataParallel`` requires) and parameters that tensor parallelism leaves whole
are split along it as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..errors import CtkError, shown

if TYPE_CHECKING:
    from torch_xla.distributed.spmd import Mesh

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MODEL_AXIS = "model"

PartitionSpec = tuple[str | None, ...]
# Devices (or processes) a mesh may span: beyond any real one (a TPU v5p pod has 8,960 chips), so a
# typo such as 99999999999999999999x1 is one line, not a mesh torch tries to build.
MAX_MESH_DEVICES = 65_536


@dataclass(frozen=True)
class MeshShape:
    """Devices along the data and model axes of the mesh."""

    data: int
    model: int

    @property
    def devices(self) -> int:
        return self.data * self.model

    def __str__(self) -> str:
        return f"{self.data}x{self.model}"


def parse_mesh(text: str) -> MeshShape:
    """``"2x2"`` -> ``MeshShape(data=2, model=2)``; anything else, or a mesh of more than
    :data:`MAX_MESH_DEVICES`, is a CtkError naming ``--mesh``."""
    found = re.fullmatch(r"\s*([1-9][0-9]*)\s*[xX]\s*([1-9][0-9]*)\s*", text)
    if found is None:
        raise CtkError(f"--mesh must look like DATAxMODEL, e.g. 4x1 or 2x2, got {shown(text)}")
    digits = len(found[1]) + len(found[2])  # checked first: int() of thousands of digits is slow, or refused
    if digits > 2 * len(str(MAX_MESH_DEVICES)) or int(found[1]) * int(found[2]) > MAX_MESH_DEVICES:
        raise CtkError(f"--mesh must span at most {MAX_MESH_DEVICES} devices (DATA*MODEL), got {shown(text)}")
    return MeshShape(int(found[1]), int(found[2]))


def build_mesh(shape: MeshShape, device_count: int, fsdp: bool = False) -> Mesh:
    """The ``xs.Mesh`` over all ``device_count`` SPMD devices (the caller has called
    ``xr.use_spmd()``). The mesh must cover every device: XLA SPMD runs one program on all of
    them, so a smaller mesh would leave devices computing garbage."""
    import torch_xla.distributed.spmd as xs

    if shape.devices != device_count:
        raise CtkError(
            f"--mesh {shape} needs {shape.devices} devices, the XLA runtime has {device_count} "
            "(on CPU set CPU_NUM_DEVICES; on a TPU VM use DATA*MODEL = the number of TPU chips/cores)"
        )
    names = (FSDP_AXIS if fsdp else DATA_AXIS, MODEL_AXIS)
    return xs.Mesh(np.arange(device_count), (shape.data, shape.model), names)


def tensor_parallel_specs(model: nn.Module, model_size: int) -> dict[str, PartitionSpec]:
    """Parameter name -> partition spec for the ``model`` axis, by the rules in the module doc.

    Names are those of ``model.named_parameters()``; parameters not listed stay replicated.
    With ``model_size == 1`` there is nothing to split and the result is empty.
    """
    specs: dict[str, PartitionSpec] = {}
    if model_size == 1:
        return specs
    previous_column: nn.Linear | None = None
    attention_outputs: set[int] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            _split(specs, module, prefix, "in_proj_weight", 0, model_size)
            _split(specs, module, prefix, "in_proj_bias", 0, model_size)
            _split(specs, module.out_proj, _join(prefix, "out_proj"), "weight", 1, model_size)
            attention_outputs.add(id(module.out_proj))
            previous_column = None
        elif isinstance(module, nn.Linear):
            if id(module) in attention_outputs:
                continue
            if previous_column is not None and module.in_features == previous_column.out_features:
                _split(specs, module, prefix, "weight", 1, model_size)
                previous_column = None
            elif _split(specs, module, prefix, "weight", 0, model_size):
                _split(specs, module, prefix, "bias", 0, model_size)
                previous_column = module
        elif isinstance(module, nn.modules.conv._ConvNd):
            if _split(specs, module, prefix, "weight", 0, model_size):
                _split(specs, module, prefix, "bias", 0, model_size)
    return specs


def shard_parameters(model: nn.Module, mesh: Mesh, specs: dict[str, PartitionSpec]) -> None:
    """Annotate each parameter of ``model`` (already on the XLA device) with its spec."""
    import torch_xla.distributed.spmd as xs

    for name, param in model.named_parameters():
        if name in specs:
            xs.mark_sharding(param, mesh, specs[name])


def sharding_of(tensor: torch.Tensor) -> str:
    """The XLA sharding annotation of a device tensor, e.g. ``{devices=[2,1,2]0,2,1,3
    last_tile_dim_replicate}``; ``""`` when it has none. Shown in logs and checked by tests: it is
    the proof that a weight is really split, not just placed on a mesh."""
    import torch_xla

    return torch_xla._XLAC._get_xla_sharding_spec(tensor)


def _split(specs: dict[str, PartitionSpec], module: nn.Module, prefix: str, attr: str, dim: int, size: int) -> bool:
    """Record ``attr`` of ``module`` as split on ``dim`` when it exists and ``size`` divides it."""
    param = getattr(module, attr, None)
    if not isinstance(param, nn.Parameter) or param.dim() <= dim or param.shape[dim] % size:
        return False
    spec: list[str | None] = [None] * param.dim()
    spec[dim] = MODEL_AXIS
    specs[_join(prefix, attr)] = tuple(spec)
    return True


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
