"""Iterative pruning: prune a little, fine-tune to recover, repeat.

Each round's target sparsity follows the cubic schedule over the rounds (round ``r`` of ``R``
prunes to ``schedule.sparsity_at(r)`` with ``start_step=0, end_step=R``), so early rounds take
the most. Masks only grow: each round's mask is combined with the ones before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import Dataset
from ..pruning.masks import Masks, apply_masks, combine_masks
from ..pruning.schedule import round_schedule
from ..pruning.structured import PruneReport, prune
from ..tasks import Task
from .finetune import CLASSIFY, finetune
from .progress import StepProgress


@dataclass
class IterativeResult:
    """Per round: the target sparsity and the mean fine-tuning loss of each epoch; the final masks."""

    sparsities: list[float]
    losses: list[list[float]]
    masks: Masks
    reports: list[PruneReport] = field(default_factory=list, repr=False)


def iterative(
    model: nn.Module,
    dataset: Dataset,
    prune_round: Callable[[int], Masks],
    rounds: int,
    epochs: int = 1,
    lr: float = 5e-3,
    seed: int = 0,
    phase: Callable[[str], StepProgress | None] = lambda _name: None,
    task: Task = CLASSIFY,
) -> tuple[list[list[float]], Masks]:
    """Call ``prune_round(r)`` for ``r = 1..rounds`` (it zeroes weights and returns its masks), each
    followed by ``epochs`` of fine-tuning with every mask so far held. Returns the losses and masks.
    ``phase(name)`` gives each round's fine-tuning its progress report."""
    masks: Masks = {}
    losses = []
    for r in range(1, rounds + 1):
        masks = combine_masks(masks, prune_round(r))
        apply_masks(model, masks)
        progress = phase(f"round {r}/{rounds}: fine-tune")
        losses.append(finetune(model, dataset, masks, epochs=epochs, lr=lr, seed=seed + r, progress=progress,
                               task=task))
    return losses, masks


def iterative_prune(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    dataset: Dataset,
    final_sparsity: float,
    rounds: int = 3,
    epochs: int = 1,
    lr: float = 5e-3,
    seed: int = 0,
    **prune_options,
) -> IterativeResult:
    """Structured pruning (:func:`prune` with ``prune_options``) in ``rounds`` rounds of prune +
    fine-tune. Channels zeroed in a round score lowest in the next, so rounds extend each other."""
    schedule = round_schedule(final_sparsity, rounds)
    reports: list[PruneReport] = []

    def prune_round(r: int) -> Masks:
        reports.append(prune(model, example_inputs, schedule.sparsity_at(r), seed=seed, **prune_options))
        return reports[-1].masks

    losses, masks = iterative(model, dataset, prune_round, rounds, epochs=epochs, lr=lr, seed=seed)
    return IterativeResult([schedule.sparsity_at(r) for r in range(1, rounds + 1)], losses, masks, reports)
