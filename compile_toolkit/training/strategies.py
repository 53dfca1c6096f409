"""The training strategies by name: how each is run and what starts its processes.

One entry per strategy (``--strategy NAME``): the CLI's choices, the config's check, the launcher
(which starts torchrun workers for those that need them) and :func:`~.trainer.train` all read this
table. Each entry imports its strategy only when a run uses it: torch_xla (``spmd``) claims devices
when imported, and the others pull in torch.distributed's parallel APIs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from .config import TrainConfig
    from .run import TrainResult


@dataclass(frozen=True)
class StrategyEntry:
    """``run(config, console)`` trains with the strategy; ``torchrun_workers``: it runs as one of the
    processes torchrun starts (one per rank), so ``ctk train --nproc-per-node`` launches it."""

    run: Callable[[TrainConfig, Console | None], TrainResult]
    torchrun_workers: bool
    data_split_by: str  # what reads different samples of a global batch, for the batch-split check


def _single(config: TrainConfig, console: Console | None) -> TrainResult:
    from .trainer import train_single

    return train_single(config, console)


def _ddp(config: TrainConfig, console: Console | None) -> TrainResult:
    from .ddp import DdpStrategy
    from .trainer import train_worker

    return train_worker(config, DdpStrategy(), console)


def _fsdp(config: TrainConfig, console: Console | None) -> TrainResult:
    from .fsdp import FsdpStrategy
    from .trainer import train_worker

    return train_worker(config, FsdpStrategy(config), console)


def _tp(config: TrainConfig, console: Console | None) -> TrainResult:
    from .tp import TpStrategy
    from .trainer import train_worker

    return train_worker(config, TpStrategy(config), console)


def _spmd(config: TrainConfig, console: Console | None) -> TrainResult:
    from .spmd import train_spmd

    return train_spmd(config, console)


STRATEGY_ENTRIES: dict[str, StrategyEntry] = {
    "single": StrategyEntry(_single, torchrun_workers=False, data_split_by="processes"),
    "ddp": StrategyEntry(_ddp, torchrun_workers=True, data_split_by="processes"),
    "spmd": StrategyEntry(_spmd, torchrun_workers=False, data_split_by="ranks of the data axis"),
    "fsdp": StrategyEntry(_fsdp, torchrun_workers=True, data_split_by="processes"),
    "tp": StrategyEntry(_tp, torchrun_workers=True, data_split_by="ranks of the data axis"),
}
STRATEGIES = tuple(STRATEGY_ENTRIES)
WORKER_STRATEGIES = tuple(name for name, entry in STRATEGY_ENTRIES.items() if entry.torchrun_workers)
