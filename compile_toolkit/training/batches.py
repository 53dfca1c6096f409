"""Which samples each rank reads at each step: a resumable, rank-aware order over any data set.

Step ``s`` of a run belongs to epoch ``s // steps_per_epoch`` and reads batch
``s % steps_per_epoch`` of that epoch's permutation, a :class:`~torch.utils.data.DistributedSampler`
seeded with ``seed`` and set to the epoch. Rank ``r`` of ``W`` takes positions ``r, r + W, ...``,
so local batch ``k`` of all ranks together is global batch ``k`` of a single process, and the
position in the epoch (the step) is all a checkpoint needs to resume mid-epoch without replaying
data. Incomplete batches are dropped, so every step sees the same number of samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ..errors import CtkError

RECALIBRATION_SAMPLES = 2048  # global samples batch-norm statistics are re-estimated on


@dataclass(frozen=True)
class StepPlan:
    """How a run walks its data: the global batch per optimizer step and how many steps."""

    batch_size: int
    steps_per_epoch: int
    steps: int
    seed: int = 0


def plan_steps(samples: int, batch_size: int, epochs: int, max_steps: int | None = None, seed: int = 0) -> StepPlan:
    """``epochs`` full epochs of the global batch over ``samples``, cut to ``max_steps`` when given."""
    steps_per_epoch = samples // batch_size
    if steps_per_epoch == 0:
        raise CtkError(f"--batch-size {batch_size} exceeds the {samples} training samples")
    steps = epochs * steps_per_epoch
    return StepPlan(batch_size, steps_per_epoch, min(steps, max_steps) if max_steps is not None else steps, seed)


class EpochSampler(Sampler[int]):
    """This rank's sample indices for batches ``[first, last)`` of one epoch (see the module docstring).

    The sampler runs in the loading process even when the data loader has worker processes, so
    :meth:`select` between epochs is seen by persistent workers too."""

    def __init__(self, samples: int, plan: StepPlan, rank: int = 0, world_size: int = 1) -> None:
        self.samples, self.plan, self.rank, self.world_size = samples, plan, rank, world_size
        self.local = plan.batch_size // world_size
        self.epoch, self.first, self.last = 0, 0, plan.steps_per_epoch

    def select(self, epoch: int, first: int, last: int) -> None:
        self.epoch, self.first, self.last = epoch, first, last

    def __iter__(self) -> Iterator[int]:
        order = DistributedSampler(range(self.samples), num_replicas=self.world_size, rank=self.rank,
                                   shuffle=True, seed=self.plan.seed, drop_last=True)
        order.set_epoch(self.epoch)
        return iter(list(order)[self.first * self.local : self.last * self.local])

    def __len__(self) -> int:
        return (self.last - self.first) * self.local


class StepLoader:
    """The batches of any step range of a run for one rank, from a :class:`DataLoader` that
    reads ``batch_size / world_size`` samples per batch (with ``workers`` processes)."""

    def __init__(self, dataset: torch.utils.data.Dataset, plan: StepPlan, rank: int = 0, world_size: int = 1,
                 workers: int = 0) -> None:
        self.plan = plan
        self.sampler = EpochSampler(len(dataset), plan, rank, world_size)  # type: ignore[arg-type]
        # Its own generator: worker seeds are drawn from it, not from the global RNG (dropout's).
        self.generator = torch.Generator()
        self.loader = DataLoader(dataset, batch_size=self.sampler.local, sampler=self.sampler, num_workers=workers,
                                 persistent_workers=workers > 0, generator=self.generator)

    def epoch(self, epoch: int, first: int, last: int) -> DataLoader:
        """The loader over batches ``[first, last)`` of ``epoch`` (iterate it once)."""
        self.sampler.select(epoch, first, last)
        self.generator.manual_seed(self.plan.seed + epoch)
        return self.loader


def recalibration_loader(dataset: torch.utils.data.Dataset, plan: StepPlan, rank: int = 0, world_size: int = 1,
                         samples: int = RECALIBRATION_SAMPLES) -> DataLoader:
    """This rank's share of the first global batches of epoch 0, ``samples`` in all at most (at
    least one batch), so every rank together (SyncBatchNorm, SPMD) sees what one process sees."""
    batches = max(1, min(plan.steps_per_epoch, samples // plan.batch_size))
    return StepLoader(dataset, plan, rank, world_size).epoch(0, 0, batches)
