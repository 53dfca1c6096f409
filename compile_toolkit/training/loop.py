"""The one training loop: every strategy, ``ctk train``, and the fine-tuning of ``ctk export`` and
``ctk prune`` run :meth:`Loop.run`.

A step updates the masks (and, at mask updates, checks that every rank agrees), takes the
objective over the step's batch, in ``accumulate`` micro-batches, under autocast for
``precision="bf16"``, zeroes the gradients of pruned weights, sets the learning rate of the
schedule, steps the optimizer and re-zeroes pruned weights (momentum and weight decay move
them). Which samples a step reads is :mod:`.batches`'; what differs per engine is a
:class:`~.strategy.Strategy` hook. The loop holds no files: the caller's :class:`Listener`
logs, evaluates and checkpoints.

A run that diverges stops with one line naming the step: at a NaN or Inf loss, and before weights
holding one are saved or returned, so no checkpoint of NaN weights is ever written.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import CtkError
from ..pruning.masks import Masks, apply_masks, mask_gradients
from ..pruning.sparsifier import Sparsifier
from ..tasks import Task, distillation_loss, model_inputs
from . import faults
from .batches import StepLoader, StepPlan
from .config import PRECISIONS, check_distillation
from .strategy import Strategy


@dataclass
class Objective:
    """What a step minimises: the task's loss, mixed with distillation from a (dense) ``teacher``
    as ``(1 - distill_weight) * task + distill_weight * KD`` when one is given, plus ``penalty()``
    (group lasso, batch-norm L1). The embed task has no labels and trains against the teacher alone."""

    task: Task
    teacher: nn.Module | None = None
    distill_weight: float = 0.5
    temperature: float = 2.0
    penalty: Callable[[], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        check_distillation(self.distill_weight, self.temperature)
        if self.task.needs_teacher and self.teacher is None:
            raise CtkError("the embed task trains against the dense model's embeddings: it needs distillation")

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to minimise, the task loss to report)."""
        args, kwargs = model_inputs(batch)
        outputs = model(*args, **kwargs)
        reference = None
        if self.teacher is not None:
            with torch.no_grad():
                reference = self.teacher(*args, **kwargs)
        if self.task.needs_teacher:
            loss = task_loss = self.task.loss(outputs, batch, reference)
        else:
            loss = task_loss = self.task.loss(outputs, batch)
            if reference is not None:
                distilled = distillation_loss(outputs, reference, self.temperature)
                loss = (1 - self.distill_weight) * task_loss + self.distill_weight * distilled
        if self.penalty is not None:
            loss = loss + self.penalty()
        return loss, task_loss.detach()


@dataclass(frozen=True)
class LrSchedule:
    """The learning rate at each step: linear warm-up over ``warmup`` steps from ``lr / warmup``,
    then constant or cosine decay to 0 at the last step. Stateless, so a resumed run needs nothing
    but the step."""

    lr: float
    steps: int
    warmup: int = 0
    decay: str = "constant"

    def at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.decay == "constant":
            return self.lr
        span = max(self.steps - self.warmup, 1)
        return self.lr * 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / span))


@dataclass
class StepRecord:
    """One step's numbers for the log and the bar; ``loss`` is the task loss of the global batch."""

    step: int
    loss: float
    sparsity: float
    samples_per_s: float
    lr: float


class Listener:
    """What the caller of :meth:`Loop.run` does around the steps (log, bar, evaluate, checkpoint)."""

    def logged(self, records: list[StepRecord]) -> None:
        """Steps whose losses were just fetched, in order."""

    def saves(self, done: int) -> bool:
        """Whether :meth:`step_done` will save the weights after ``done`` steps (they are checked first)."""
        return False

    def step_done(self, done: int) -> None:
        """``done`` steps are complete (called on every rank: collectives may run here)."""


@dataclass
class Loop:
    """One run's parts. ``model`` is the bare module (its parameters are what the optimizer,
    masks and checkpoints see); ``trained`` is what a step calls (a DDP or FSDPv2 wrapper, or
    ``model``). ``held`` masks stay fixed; a ``sparsifier`` updates its own on its schedule.
    ``divergence_hint`` ends the error of a run that diverged: what to change (the caller's options)."""

    model: nn.Module
    trained: nn.Module
    data: torch.utils.data.Dataset
    plan: StepPlan
    objective: Objective
    optimizer: torch.optim.Optimizer
    lr: LrSchedule
    strategy: Strategy
    sparsifier: Sparsifier | None = None
    held: Masks = field(default_factory=dict)
    precision: str = "fp32"
    accumulate: int = 1
    workers: int = 0
    divergence_hint: str = "lower the learning rate"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise CtkError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        local = self.plan.batch_size // self.strategy.data_size
        if isinstance(self.accumulate, bool) or not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise CtkError(f"--accumulate must be a positive integer, got {self.accumulate!r}")
        if local % self.accumulate:
            raise CtkError(f"--accumulate {self.accumulate} must divide each process's batch of {local} samples "
                           f"(--batch-size {self.plan.batch_size} over {self.strategy.data_size} process(es))")

    def sparsity(self) -> float:
        return self.sparsifier.sparsity() if self.sparsifier is not None else 0.0

    def run(self, start: int = 0, listener: Listener | None = None) -> None:
        """Steps ``start`` to ``plan.steps``; the model is in training mode meanwhile, eval mode after."""
        listener = listener or Listener()
        loader = StepLoader(self.data, self.plan, self.strategy.data_rank, self.strategy.data_size, self.workers)
        per_epoch = self.plan.steps_per_epoch
        pending: list[tuple[int, torch.Tensor, float, float]] = []
        sparsity = self.sparsity()
        since = time.perf_counter()
        step = start
        self.model.train()
        try:
            while step < self.plan.steps:
                epoch, first = divmod(step, per_epoch)
                last = min(per_epoch, self.plan.steps - epoch * per_epoch)
                for batch in self.strategy.batches(loader.epoch(epoch, first, last)):
                    faults.maybe_fail(step, self.strategy.rank)
                    if self._update_masks(step):
                        sparsity = self.sparsity()
                    lr = self.lr.at(step)
                    pending.append((step, self._step(batch, lr), sparsity, lr))
                    step += 1
                    keeping = step == self.plan.steps or listener.saves(step)  # the weights leave the loop
                    if keeping or step % self.strategy.log_every == 0:
                        since = self._flush(pending, listener, since)
                    if keeping:
                        self._check_weights(step)
                    listener.step_done(step)
            if pending:
                self._flush(pending, listener, since)
        finally:
            self.model.eval()

    def _update_masks(self, step: int) -> bool:
        """The sparsifier's update for ``step`` (checked across ranks); True when masks changed."""
        if self.sparsifier is None:
            return False
        changed = self.sparsifier.update(step)
        if self.sparsifier.schedule.is_update_step(step):
            faults.maybe_corrupt_masks(self.sparsifier.masks, self.strategy.rank)
            self.strategy.check_masks(self.sparsifier.masks, step)
        self.strategy.cut()  # a mask update is its own graph: every step's graph stays the same
        return changed

    def _step(self, batch: Any, lr: float) -> torch.Tensor:
        """One optimizer step with masks held; returns the task loss of the global batch (on the device)."""
        self.optimizer.zero_grad(set_to_none=True)
        micro = split_batch(batch, self.accumulate)
        task_loss = torch.zeros((), device=self.strategy.device)
        autocast = torch.autocast(self.strategy.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        for index, part in enumerate(micro):
            last = index == len(micro) - 1
            with self.strategy.no_sync(self.trained) if not last else contextlib.nullcontext():
                with autocast:
                    loss, value = self.objective(self.trained, part)
                (loss / len(micro)).backward()
            task_loss = task_loss + value.float() / len(micro)
        self._hold(mask_gradients)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self._hold(apply_masks)
        self.strategy.cut()
        return self.strategy.mean(task_loss)

    def _hold(self, hold: Callable[[nn.Module, Masks], None]) -> None:
        hold(self.model, self.held)
        if self.sparsifier is not None:
            hold(self.sparsifier.model, self.sparsifier.masks)

    def _flush(self, pending: list[tuple[int, torch.Tensor, float, float]], listener: Listener, since: float) -> float:
        """Fetch the pending losses (one wait for the device) and hand them to the listener.
        Throughput is the window's average: with asynchronous execution one step's time means nothing."""
        now = time.perf_counter()
        throughput = self.plan.batch_size * len(pending) / max(now - since, 1e-9)
        records = [StepRecord(step, float(loss.item()), sparsity, throughput, lr)
                   for step, loss, sparsity, lr in pending]
        pending.clear()
        for record in records:
            if not math.isfinite(record.loss):
                raise self._diverged(record.step + 1, f"the loss is {record.loss}")
        listener.logged(records)
        return time.perf_counter()

    def _check_weights(self, done: int) -> None:
        """Fail when an update left a NaN or Inf in a parameter, before the weights are kept: a
        step's loss is taken before its update, so the last update shows in the weights alone.
        Each rank counts its own parameters (its shards, when sharded) and the counts are summed,
        so all ranks stop together."""
        bad = torch.zeros((), device=self.strategy.device)
        for parameter in self.model.parameters():
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter  # a DTensor's shard
            bad = bad + (~torch.isfinite(local.detach())).any().to(bad.device)
        if self.strategy.mean(bad).item() > 0:
            raise self._diverged(done, "its update left NaN or Inf weights")

    def _diverged(self, step: int, what: str) -> CtkError:
        """The error that stops a run at ``step`` (counted from 1): continuing would only carry NaN
        on, into the log, the masks (magnitudes of NaN) and the checkpoints."""
        return CtkError(f"training diverged at step {step} of {self.plan.steps}: {what}; {self.divergence_hint}")


def split_batch(batch: Any, parts: int) -> list[Any]:
    """``batch`` (a tensor, or tuples/lists/dicts of them, batch first) as ``parts`` equal micro-batches."""
    if parts == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        return list(batch.chunk(parts))
    if isinstance(batch, dict):
        split = {key: split_batch(value, parts) for key, value in batch.items()}
        return [{key: chunks[i] for key, chunks in split.items()} for i in range(parts)]
    if isinstance(batch, (list, tuple)):
        columns = [split_batch(item, parts) for item in batch]
        return [type(batch)(column[i] for column in columns) for i in range(parts)]
    raise CtkError(f"--accumulate: cannot split a batch of {type(batch).__name__} into micro-batches")
