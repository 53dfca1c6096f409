"""Sparse training, single process, DDP (torchrun) and XLA SPMD.

``train(TrainConfig(...))`` runs any strategy; ``ctk train`` is its command line.
"""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .run import TrainResult
from .trainer import train

__all__ = ["Checkpoint", "TrainConfig", "TrainResult", "load_checkpoint", "save_checkpoint", "train"]
