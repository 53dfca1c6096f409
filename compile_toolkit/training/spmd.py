"""Sparse training on an XLA device mesh (torch_xla SPMD): one program, every device.

Under SPMD the process sees the whole model and the whole global batch as ordinary tensors; the
annotations from :mod:`.mesh` say how they are split (batch along ``data``, weights along
``model``, with FSDPv2 also along ``fsdp``) and the XLA partitioner turns that into per-device
programs with the needed collectives. So the loop is the one loop of :mod:`.loop` (same
batches from :mod:`.batches`, same sparsifier, same optimizer) and a run on any mesh computes
what one device computes, up to float rounding: batch norm even sees global-batch statistics
without any SyncBatchNorm.

What is XLA-specific lives in :class:`SpmdStrategy`'s hooks: batches reach the devices through
torch_xla's parallel loader, split on the data axis; ``torch_xla.sync()`` cuts the lazy graph
after every mask update and every step (each runs one compiled program instead of a graph that
grows); losses stay on the device and are fetched every :data:`LOG_EVERY` steps, so the host
does not stall the device each step; masks are the sparsifier's own tensors, living on the mesh
like the weights they mask. Checkpoints gather every tensor to the CPU with plain names, so a run
saved on one mesh shape resumes on any other (or under ``single``/``ddp``).

torch_xla is imported only here, when a :class:`SpmdStrategy` is made: ``xr.use_spmd()`` cannot be undone
in a process, and nothing else in the toolkit should load it by accident.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from torch import nn

from ..errors import CtkError
from .config import TrainConfig
from .mesh import (
    DATA_AXIS,
    FSDP_AXIS,
    build_mesh,
    parse_mesh,
    shard_parameters,
    sharding_of,
    tensor_parallel_specs,
)
from .run import TrainResult, run_training
from .strategy import Strategy, to_device

if TYPE_CHECKING:
    from torch_xla.distributed.spmd import Mesh

LOG_EVERY = 10  # steps between loss fetches (and progress-bar updates)


def train_spmd(config: TrainConfig, console: Console | None = None) -> TrainResult:
    """Train ``config`` on the mesh ``config.mesh`` of all XLA devices of this host.

    The result's ``model`` and ``masks`` are on the CPU (gathered from the mesh); the log's meta
    records the mesh and each parameter's XLA sharding. Set ``PJRT_DEVICE`` (``TPU``, or ``CPU``
    with ``CPU_NUM_DEVICES``) before calling: the runtime reads it once.
    """
    config.validate()
    if config.strategy != "spmd":
        raise CtkError(f"train_spmd runs --strategy spmd, got --strategy {config.strategy!r}")
    if config.sync_batchnorm:
        raise CtkError("--sync-batchnorm is for --strategy ddp: under spmd batch norm already sees the global batch")
    return run_training(config, SpmdStrategy(config), console)


class SpmdStrategy(Strategy):
    """One process driving every XLA device of the host as one mesh."""

    name = "spmd"
    log_every = LOG_EVERY

    def __init__(self, config: TrainConfig) -> None:
        self.shape = parse_mesh(config.mesh)
        if config.batch_size % self.shape.data:
            raise CtkError(f"--batch-size {config.batch_size} must be divisible by the data axis of --mesh {self.shape}")
        # After the checks: importing torch_xla logs the PJRT device it picks, which is noise before an error.
        import torch_xla
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        if not xr.is_spmd():
            xr.use_spmd()
        if xr.process_count() > 1:
            # Each host would need its own slice of the data and checkpoints gathered across hosts.
            raise CtkError(f"--strategy spmd runs on one host (a TPU VM up to v*-8); this run spans {xr.process_count()} hosts")
        self.devices = xr.global_runtime_device_count()
        self.mesh: Mesh = build_mesh(self.shape, self.devices, fsdp=config.fsdp)
        xs.set_global_mesh(self.mesh)
        self.fsdp = config.fsdp
        self.data_axis = FSDP_AXIS if config.fsdp else DATA_AXIS
        super().__init__(torch_xla.device())

    def place(self, module: nn.Module) -> nn.Module:
        """On the devices, weights split on the ``model`` axis."""
        module.to(self.device)
        shard_parameters(module, self.mesh, tensor_parallel_specs(module, self.shape.model))
        return module

    def wrap(self, model: nn.Module) -> nn.Module:
        """With ``fsdp``, torch_xla's FSDPv2 wrapper (``SpmdFullyShardedDataParallel``), which
        splits every parameter tensor parallelism left whole along its largest dimension on the
        ``fsdp`` axis (XLA gathers them per layer) and shards the logits by batch. The bare
        ``model`` keeps plain parameter names for the sparsifier, the optimizer and checkpoints."""
        if not self.fsdp:
            return model
        from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel

        return SpmdFullyShardedDataParallel(model, mesh=self.mesh)

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Through torch_xla's parallel loader (host-to-device copies overlap the steps), every
        tensor of the inputs' rank split along the data axis on arrival."""
        import torch_xla.distributed.parallel_loader as pl
        import torch_xla.distributed.spmd as xs

        dims = _input_dims(loader)
        spec = xs.ShardingSpec(self.mesh, (self.data_axis,) + (None,) * (dims - 1))
        return iter(pl.MpDeviceLoader(loader, self.device, input_sharding=spec))

    def eval_batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Replicated: a last validation batch need not divide over the data axis."""
        for batch in loader:
            yield to_device(batch, self.device)

    def cut(self) -> None:
        import torch_xla

        torch_xla.sync()

    def meta(self) -> dict[str, Any]:
        return {"world_size": 1, "mesh": str(self.shape), "fsdp": self.fsdp}  # one process drives the mesh

    def log_meta(self, model: nn.Module) -> dict[str, Any]:
        return {"devices": self.devices, "shardings": parameter_shardings(model)}

    def finish(self, model: nn.Module) -> nn.Module:
        """Gathers every shard: the caller gets an ordinary CPU module."""
        return model.to("cpu")


def parameter_shardings(model: nn.Module) -> dict[str, str]:
    """Parameter name -> XLA sharding annotation (``{replicated}`` when whole on every device)."""
    return {name: sharding_of(param) or "{replicated}" for name, param in model.named_parameters()}


def _input_dims(loader: Any) -> int:
    """The rank of the first input tensor of the loader's samples (its batch adds one dimension)."""
    sample = loader.dataset[0]
    first = next(iter(sample.values())) if isinstance(sample, dict) else sample[0] if isinstance(sample, (tuple, list)) else sample
    if not isinstance(first, torch.Tensor):
        raise CtkError(f"--strategy spmd needs tensor samples, got {type(first).__name__}")
    return first.dim() + 1
