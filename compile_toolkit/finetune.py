"""Brief fine-tuning after pruning, with the pruning masks held (and, optionally, sparse training:
a gradual schedule pruning as it trains, and a sparsity penalty added to the loss)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from .models import Dataset
from .pruning.masks import Masks, apply_masks, mask_gradients
from .pruning.sparsifier import Sparsifier
from .tasks import Task, distillation_loss, model_inputs

if TYPE_CHECKING:  # importing compile_toolkit.training here would import this module back
    from .training.progress import StepProgress

TrainData = Dataset | torch.utils.data.Dataset
CLASSIFY = Task("classify")


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
) -> list[float]:
    """Train on the training split (Adam, cosine-decayed learning rate); pruned weights get no gradient and are
    re-zeroed after every step, so the zero pattern strip relies on survives. Returns the mean task loss of each
    epoch.

    ``dataset`` is the digits set (its training split) or any map-style data set of the ``task``'s batches
    (image folders, tokenized text), read in a seeded order. ``teacher`` (the dense model, eval mode) adds
    knowledge distillation: the loss becomes ``(1 - w) * task + w * KD`` with ``w = distill_weight``; the
    embed task has no labels and trains against the teacher alone.
    ``sparsifier``: its masks are held too, and ``sparsifier.update(step)`` runs before every step (steps count
    from 0), so a gradual schedule prunes while the network recovers. ``penalty()`` is added to
    the loss (group lasso, batch-norm L1) to push whole structures towards zero before they are pruned.
    ``progress`` is told after every step, so a long fine-tuning shows that it moves."""
    loader = training_loader(dataset, batch_size, seed, workers)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    if teacher is not None:
        teacher.eval()
    losses = []
    step = 0
    model.train()
    try:
        for _ in range(epochs):
            total, seen = 0.0, 0
            for batch in loader:
                tick = time.perf_counter()
                if sparsifier is not None:
                    sparsifier.update(step)
                optimizer.zero_grad(set_to_none=True)
                loss, value = _loss(model, batch, task, teacher, distill_weight, temperature)
                size = _batch_size(batch)
                total, seen = total + value * size, seen + size
                if penalty is not None:
                    loss = loss + penalty()
                loss.backward()
                _hold(model, masks, sparsifier, mask_gradients)
                optimizer.step()
                schedule.step()
                _hold(model, masks, sparsifier, apply_masks)
                step += 1
                if progress is not None:
                    progress(step, steps, value, size / max(time.perf_counter() - tick, 1e-9))
            losses.append(total / max(seen, 1))
    finally:
        model.eval()
    return losses


def training_loader(dataset: TrainData, batch_size: int, seed: int = 0, workers: int = 0) -> DataLoader:
    """Batches of the training split in a seeded random order (a fresh permutation per epoch),
    drawn from their own generator so the global RNG (dropout) is left as it was."""
    if isinstance(dataset, Dataset):
        dataset = TensorDataset(dataset.x_train, dataset.y_train)
    order = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=order),
                      num_workers=workers, generator=torch.Generator().manual_seed(seed))


def steps_per_epoch(dataset: TrainData, batch_size: int) -> int:
    samples = len(dataset.x_train) if isinstance(dataset, Dataset) else len(dataset)
    return -(-samples // batch_size)


def _batch_size(batch: object) -> int:
    args, kwargs = model_inputs(batch)
    return len(args[0] if args else next(iter(kwargs.values())))


def _loss(model: nn.Module, batch: object, task: Task, teacher: nn.Module | None, weight: float,
          temperature: float) -> tuple[torch.Tensor, float]:
    """The training loss and the task loss's value (what the epoch mean reports)."""
    args, kwargs = model_inputs(batch)
    outputs = model(*args, **kwargs)
    if teacher is None:
        loss = task.loss(outputs, batch)
        return loss, loss.item()
    with torch.no_grad():
        reference = teacher(*args, **kwargs)
    if task.name == "embed":
        loss = task.loss(outputs, batch, reference)
        return loss, loss.item()
    task_loss = task.loss(outputs, batch)
    loss = (1 - weight) * task_loss + weight * distillation_loss(outputs, reference, temperature)
    return loss, task_loss.item()


def _hold(
    model: nn.Module, masks: Masks, sparsifier: Sparsifier | None, hold: Callable[[nn.Module, Masks], None]
) -> None:
    hold(model, masks)
    if sparsifier is not None:
        hold(sparsifier.model, sparsifier.masks)
