"""Brief fine-tuning after pruning, with the pruning masks held (and, optionally, sparse training:
a gradual schedule pruning as it trains, and a sparsity penalty added to the loss)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .models import Dataset
from .pruning.masks import Masks, apply_masks, mask_gradients
from .pruning.sparsifier import Sparsifier

if TYPE_CHECKING:  # importing compile_toolkit.training here would import this module back
    from .training.progress import StepProgress


def finetune(
    model: nn.Module,
    dataset: Dataset,
    masks: Masks,
    epochs: int = 5,
    lr: float = 5e-3,
    batch_size: int = 64,
    seed: int = 0,
    *,
    sparsifier: Sparsifier | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    progress: StepProgress | None = None,
) -> list[float]:
    """Train on the training split (Adam, cosine-decayed learning rate); pruned weights get no gradient and are
    re-zeroed after every step, so the zero pattern strip relies on survives. Returns the mean loss of each epoch.

    ``sparsifier``: its masks are held too, and ``sparsifier.update(step)`` runs before every step (steps count
    from 0), so a gradual schedule prunes while the network recovers. ``penalty()`` is added to
    the loss (group lasso, batch-norm L1) to push whole structures towards zero before they are pruned.
    ``progress`` is told after every step, so a long fine-tuning shows that it moves."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * steps_per_epoch(dataset, batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    loss_fn = nn.CrossEntropyLoss()
    x, y = dataset.x_train, dataset.y_train
    losses = []
    step = 0
    model.train()
    try:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            total = 0.0
            for start in range(0, len(x), batch_size):
                tick = time.perf_counter()
                batch = order[start : start + batch_size]
                if sparsifier is not None:
                    sparsifier.update(step)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[batch]), y[batch])
                value = loss.item()
                total += value * len(batch)
                if penalty is not None:
                    loss = loss + penalty()
                loss.backward()
                _hold(model, masks, sparsifier, mask_gradients)
                optimizer.step()
                schedule.step()
                _hold(model, masks, sparsifier, apply_masks)
                step += 1
                if progress is not None:
                    progress(step, steps, value, len(batch) / max(time.perf_counter() - tick, 1e-9))
            losses.append(total / len(x))
    finally:
        model.eval()
    return losses


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
    return -(-len(dataset.x_train) // batch_size)


def _hold(
    model: nn.Module, masks: Masks, sparsifier: Sparsifier | None, hold: Callable[[nn.Module, Masks], None]
) -> None:
    hold(model, masks)
    if sparsifier is not None:
        hold(sparsifier.model, sparsifier.masks)
