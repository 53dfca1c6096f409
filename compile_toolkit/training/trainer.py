"""``train(config)``: one entry point for every strategy, used by ``ctk train`` and the Python API."""

from __future__ import annotations

import os

from rich.console import Console

from ..errors import CtkError
from .config import TrainConfig
from .run import TrainResult, run_training
from .strategy import Strategy


def train(config: TrainConfig, console: Console | None = None) -> TrainResult:
    """Validate ``config`` and run it with its strategy.

    ``single`` trains in this process (CUDA when available); ``ddp`` expects to be one of the
    processes torchrun started (see docs/ddp.md); ``spmd`` trains on an XLA device mesh.
    """
    config.validate()
    if config.strategy == "ddp":
        from .ddp import train_ddp

        return train_ddp(config, console)
    if config.strategy == "spmd":
        from .spmd import train_spmd

        return train_spmd(config, console)
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1":
        raise CtkError(f"--strategy single was started as one of {world} torchrun processes; use --strategy ddp")
    return run_training(config, Strategy(), console)
