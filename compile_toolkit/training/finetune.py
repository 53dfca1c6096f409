"""Brief fine-tuning after pruning, with the pruning masks held (and, optionally, sparse training:
a gradual schedule pruning as it trains, and a sparsity penalty added to the loss): the one
training loop of :mod:`.loop`, in this process."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..models import Dataset
from ..pruning.masks import Masks
from ..pruning.sparsifier import Sparsifier
from ..tasks import Classify, Task
from .batches import plan_steps
from .loop import Listener, Loop, LrSchedule, Objective, StepRecord
from .progress import StepProgress
from .strategy import Strategy

TrainData = Dataset | torch.utils.data.Dataset
CLASSIFY = Classify()


def finetune(
    model: nn.Module,
    dataset: TrainData,
    masks: Masks,
    epochs: int = 5,
    lr: float = 5e-3,
    batch_size: int = 64,
    seed: int = 0,
    *,
    sparsifier: Sparsifier | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    progress: StepProgress | None = None,
    task: Task = CLASSIFY,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.5,
    temperature: float = 2.0,
    workers: int = 0,
    precision: str = "fp32",
    accumulate: int = 1,
    warmup_steps: int = 0,
    max_steps: int | None = None,
) -> list[float]:
    """Train on the training split (Adam, warm-up then cosine-decayed learning rate); pruned weights get no
    gradient and are re-zeroed after every step, so the zero pattern strip relies on survives. Returns the mean
    task loss of each epoch.

    ``dataset`` is the digits set (its training split) or any map-style data set of the ``task``'s batches
    (image folders, tokenized text), read in a seeded order, in full batches of ``batch_size`` (cut to the data
    set's size when it is smaller). ``teacher`` (the dense model) adds knowledge distillation: the loss becomes
    ``(1 - w) * task + w * KD`` with ``w = distill_weight``; the embed task has no labels and trains against the
    teacher alone.
    ``sparsifier``: its masks are held too, and ``sparsifier.update(step)`` runs before every step (steps count
    from 0), so a gradual schedule prunes while the network recovers. ``penalty()`` is added to
    the loss (group lasso, batch-norm L1) to push whole structures towards zero before they are pruned.
    ``progress`` is told after every step, so a long fine-tuning shows that it moves."""
    data = training_split(dataset)
    device = next(model.parameters()).device
    plan = plan_steps(len(data), min(batch_size, len(data)), epochs, max_steps, seed)
    if teacher is not None:
        teacher.eval()
    loop = Loop(model, model, data, plan, Objective(task, teacher, distill_weight, temperature, penalty),
                torch.optim.Adam(model.parameters(), lr=lr), LrSchedule(lr, plan.steps, warmup_steps, "cosine"),
                Strategy(device), sparsifier, held=masks, precision=precision, accumulate=accumulate, workers=workers)
    epoch_losses: list[list[float]] = [[] for _ in range(-(-plan.steps // plan.steps_per_epoch))]

    class _Progress(Listener):
        def logged(self, records: list[StepRecord]) -> None:
            for record in records:
                epoch_losses[record.step // plan.steps_per_epoch].append(record.loss)
                if progress is not None:
                    progress(record.step + 1, plan.steps, record.loss, record.samples_per_s)

    loop.run(0, _Progress())
    return [sum(losses) / len(losses) for losses in epoch_losses]


def training_split(dataset: TrainData) -> torch.utils.data.Dataset:
    """The samples to train on: the built-in digits' training tensors, or the given split as it is."""
    return TensorDataset(dataset.x_train, dataset.y_train) if isinstance(dataset, Dataset) else dataset


def steps_per_epoch(dataset: TrainData, batch_size: int) -> int:
    """Optimizer steps per epoch of :func:`finetune` (full batches only)."""
    samples = len(dataset.x_train) if isinstance(dataset, Dataset) else len(dataset)  # type: ignore[arg-type]
    return plan_steps(samples, min(batch_size, samples), 1).steps_per_epoch
