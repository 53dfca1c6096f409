"""``train(config)``: one entry point for every strategy, used by ``ctk train`` and the Python API."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from rich.console import Console

from ..errors import CtkError
from .config import TrainConfig
from .run import TrainResult, run_training
from .strategies import STRATEGY_ENTRIES
from .strategy import Strategy

if TYPE_CHECKING:
    from .ddp import DdpStrategy  # fsdp and tp strategies are DDP ones: torchrun workers in a process group


def train(config: TrainConfig, console: Console | None = None) -> TrainResult:
    """Validate ``config`` and run it with its strategy (:data:`~.strategies.STRATEGY_ENTRIES`).

    ``single`` trains in this process (CUDA when available); ``ddp``, ``fsdp`` and ``tp`` expect
    to be one of the processes torchrun started (see docs/ddp.md, docs/parallel.md); ``spmd``
    trains on an XLA device mesh.
    """
    config.validate()
    return STRATEGY_ENTRIES[config.strategy].run(config, console)


def train_single(config: TrainConfig, console: Console | None) -> TrainResult:
    """Train in this process; refused inside a torchrun process group (the ranks would each train alone)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1":
        raise CtkError(f"--strategy single was started as one of {world} torchrun processes; use --strategy ddp, fsdp or tp")
    return run_training(config, Strategy(), console)


def train_worker(config: TrainConfig, strategy: DdpStrategy, console: Console | None) -> TrainResult:
    """Train as this torchrun worker; every worker returns the same result, rank 0 writes files.
    The process group goes with the run, whatever happens."""
    try:
        return run_training(config, strategy, console)
    finally:
        strategy.close()
