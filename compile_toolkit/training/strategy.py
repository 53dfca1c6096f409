"""What differs between the engines one training loop runs on: the hooks of :mod:`.loop`.

The base class is a lone process (CUDA when available, else the CPU); :mod:`.ddp` and
:mod:`.spmd` override only what their engine changes: where tensors live, how a batch reaches
the device, averaging across ranks, the cross-rank mask check, when the lazy graph is cut, how
often the loss is fetched, and what a checkpoint must gather.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..pruning.masks import Masks
from ..pruning.sparsifier import Sparsifier
from .config import TrainConfig


class Strategy:
    """This process's place in a run, and the engine's hooks; the base class is a lone process."""

    name = "single"
    rank = 0
    world_size = 1
    log_every = 1  # steps between loss fetches: every fetch waits for the device
    sharded = False  # parameters split over ranks: checkpoints are DCP shards (:mod:`.dcp`)

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        """The module to train (e.g. with SyncBatchNorm), placed, before the optimizer sees its parameters."""
        return self.place(model)

    def place(self, module: nn.Module) -> nn.Module:
        """``module`` where this rank computes (a teacher goes there too)."""
        return module.to(self.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call in the loop (e.g. DDP around ``model``); parameters are shared."""
        return model

    @property
    def data_rank(self) -> int:
        """Which share of the global batch this rank reads (tensor-parallel peers read the same)."""
        return self.rank

    @property
    def data_size(self) -> int:
        """How many shares the global batch is split into."""
        return self.world_size

    def shard(self, model: nn.Module, sparsifier: Sparsifier) -> Sparsifier:
        """Split ``model``'s parameters over the ranks (FSDP2, tensor parallel), with the masks of
        the ``sparsifier`` built on the whole model; returns the sparsifier to train with."""
        return sparsifier

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The loader's batches on this rank's device."""
        for batch in loader:
            yield to_device(batch, self.device)

    def eval_batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Validation batches on this rank's device (evaluation may place them differently)."""
        return self.batches(loader)

    def no_sync(self, trained: nn.Module) -> contextlib.AbstractContextManager:
        """Skip gradient synchronisation for a micro-batch that is not the last of its step."""
        return contextlib.nullcontext()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average of ``value`` over all ranks."""
        return value

    def check_masks(self, masks: Masks, step: int) -> None:
        """Fail when the ranks' masks differ (nothing to compare for one process)."""

    def cut(self) -> None:
        """End the work queued so far as one unit (XLA: one compiled graph); nothing to do eagerly."""

    def gather_objects(self, mine: Any) -> list[Any]:
        """Every rank's ``mine`` (picklable), in rank order; a lone process has its own only."""
        return [mine]

    def gather_rng(self) -> dict[str, torch.Tensor]:
        """Every rank's RNG states (CPU, and CUDA on GPUs), each stacked in rank order ``[world_size, n]``."""
        return {name: state.unsqueeze(0) for name, state in rng_states(self.device).items()}

    def meta(self) -> dict[str, Any]:
        """What checkpoints and the log record about the engine."""
        return {"world_size": self.world_size}

    def log_meta(self, model: nn.Module) -> dict[str, Any]:
        """What only the training log records about how ``model`` is placed."""
        return {}

    def finish(self, model: nn.Module) -> nn.Module:
        """The trained model as the caller gets it."""
        return model


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states: ``torch`` (CPU) and, on a GPU, ``cuda`` (dropout and the like draw from it)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (tuples, lists, dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


def to_cpu(value: Any) -> Any:
    """``value`` on the CPU (gathered from a mesh, off a GPU): checkpoints hold no devices. State
    dicts hold detached tensors already."""
    return to_device(value, torch.device("cpu"))
