"""Training: sparse training in one process, under DDP (torchrun) and XLA SPMD, and the
workflows that prune and recover in turn (fine-tuning, iterative pruning, recipes), all on the
one loop of :mod:`.loop`.

``train(TrainConfig(...))`` runs any strategy; ``ctk train`` is its command line.
"""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .finetune import finetune
from .iterative import IterativeResult, iterative, iterative_prune
from .run import TrainResult
from .run_recipe import RecipeResult, apply_recipe
from .trainer import train

__all__ = [
    "Checkpoint",
    "IterativeResult",
    "RecipeResult",
    "TrainConfig",
    "TrainResult",
    "apply_recipe",
    "finetune",
    "iterative",
    "iterative_prune",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
