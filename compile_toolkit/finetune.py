"""Brief fine-tuning after pruning, with the pruning masks held."""

from __future__ import annotations

import torch
from torch import nn

from .models import Dataset
from .pruning import apply_masks, mask_gradients
from .pruning.masks import Masks


def finetune(
    model: nn.Module,
    dataset: Dataset,
    masks: Masks,
    epochs: int = 5,
    lr: float = 5e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> list[float]:
    """Train on the training split (Adam, cosine-decayed learning rate); pruned weights get no gradient and are re-zeroed after every
    step, so the zero pattern strip relies on survives. Returns the mean loss of each epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(dataset.x_train) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    loss_fn = nn.CrossEntropyLoss()
    x, y = dataset.x_train, dataset.y_train
    losses = []
    model.train()
    try:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            total = 0.0
            for start in range(0, len(x), batch_size):
                batch = order[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[batch]), y[batch])
                loss.backward()
                mask_gradients(model, masks)
                optimizer.step()
                schedule.step()
                apply_masks(model, masks)
                total += loss.item() * len(batch)
            losses.append(total / len(x))
    finally:
        model.eval()
    return losses
