"""``train(config)``: one entry point for every strategy, used by ``ctk train`` and the Python API."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from rich.console import Console

from ..errors import CtkError
from .config import TrainConfig
from .run import TrainResult, run_training
from .strategy import Strategy

if TYPE_CHECKING:
    from .ddp import DdpStrategy  # fsdp and tp strategies are DDP ones: torchrun workers in a process group


def train(config: TrainConfig, console: Console | None = None) -> TrainResult:
    """Validate ``config`` and run it with its strategy.

    ``single`` trains in this process (CUDA when available); ``ddp``, ``fsdp`` and ``tp`` expect
    to be one of the processes torchrun started (see docs/ddp.md, docs/parallel.md); ``spmd``
    trains on an XLA device mesh.
    """
    config.validate()
    if config.strategy == "ddp":
        from .ddp import DdpStrategy

        return _run_worker(config, DdpStrategy(), console)
    if config.strategy == "fsdp":
        from .fsdp import FsdpStrategy

        return _run_worker(config, FsdpStrategy(config), console)
    if config.strategy == "tp":
        from .tp import TpStrategy

        return _run_worker(config, TpStrategy(config), console)
    if config.strategy == "spmd":
        from .spmd import train_spmd

        return train_spmd(config, console)
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1":
        raise CtkError(f"--strategy single was started as one of {world} torchrun processes; use --strategy ddp, fsdp or tp")
    return run_training(config, Strategy(), console)


def _run_worker(config: TrainConfig, strategy: DdpStrategy, console: Console | None) -> TrainResult:
    """Train as this torchrun worker; every worker returns the same result, rank 0 writes files.
    The process group goes with the run, whatever happens."""
    try:
        return run_training(config, strategy, console)
    finally:
        strategy.close()
