"""The sparse-training loop every data-parallel strategy shares (its pieces: :mod:`.run_setup`).

A run is a fixed sequence of optimizer steps over the training split: step ``s`` belongs to epoch
``s // steps_per_epoch`` and takes batch ``s % steps_per_epoch`` of that epoch's permutation (a
:class:`~torch.utils.data.DistributedSampler` seeded with ``seed + epoch``). Each of ``W`` ranks
takes every ``W``-th sample of the global batch, so the union over ranks is exactly the batch a
single process takes, and a checkpoint at any step resumes mid-epoch without replaying data.

What differs between strategies (averaging across ranks, the mask check, gathering RNG states,
wrapping the model) lives behind :class:`Replica`; a single process is the trivial replica.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from ..errors import CtkError, summary
from ..pruning.masks import Masks
from ..pruning.sparsifier import Sparsifier
from . import faults
from .checkpoint import Checkpoint, newest_intact_checkpoint, save_checkpoint
from .config import RESUME_KEYS, TrainConfig
from .progress import StepLog, progress_bar
from .run_setup import (
    build_model,
    build_optimizer,
    build_sparsifier,
    epoch_batches,
    plan_steps,
    recalibrate_after_pruning,
    recalibration_indices,
)

__all__ = ["Replica", "TrainResult", "resume_point", "rng_states", "run_training"]


@dataclass
class TrainResult:
    """What a run produced. ``losses`` holds the global-batch loss of every step from step 0
    (a resumed run includes the steps before its checkpoint when a log folder was given);
    ``seconds`` is the whole run, ``samples_per_s`` the training loop alone (no start-up)."""

    config: TrainConfig
    steps: int
    losses: list[float]
    sparsity: float
    model: nn.Module
    masks: Masks
    world_size: int = 1
    checkpoint: Path | None = None
    log: Path | None = None
    plot: Path | None = None
    seconds: float = 0.0
    samples_per_s: float = 0.0
    resumed_from: int | None = None
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    recalibrated_norms: int = 0


class Replica:
    """This process's place among the processes of a run; the base class is a lone process."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        """The module to train (e.g. with SyncBatchNorm), before the optimizer sees its parameters."""
        return model.to(self.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call in the loop (e.g. DDP around ``model``); parameters are shared."""
        return model

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average of ``value`` over all ranks."""
        return value

    def check_masks(self, masks: Masks, step: int) -> None:
        """Fail when the ranks' masks differ (nothing to compare for one process)."""

    def gather_rng(self) -> dict[str, torch.Tensor]:
        """Every rank's RNG states (CPU, and CUDA on GPUs), each stacked in rank order ``[world_size, n]``."""
        return {name: state.unsqueeze(0) for name, state in rng_states(self.device).items()}


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states: ``torch`` (CPU) and, on a GPU, ``cuda`` (dropout and the like draw from it)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def run_training(config: TrainConfig, replica: Replica, console: Console | None = None) -> TrainResult:
    """Train ``config`` as ``replica``'s rank: the loop of every data-parallel strategy.

    Rank 0 reports (bar, log, plot) and writes checkpoints; every rank takes part in the
    collectives, so all ranks must call this together.
    """
    started = time.perf_counter()
    torch.manual_seed(config.seed + replica.rank)
    loaded = build_model(config)
    dataset = loaded.dataset
    steps_per_epoch, steps = plan_steps(config, loaded)

    model = replica.prepare(loaded.module, config)
    sparsifier = build_sparsifier(config, model, steps, loaded.example_inputs)
    optimizer = build_optimizer(config, model)
    reporting = replica.rank == 0
    log = StepLog(config.log_dir if reporting else None, meta={"title": f"{loaded.name}, {config.strategy}"})
    start, resumed_from = 0, None
    checkpoint = resume_point(config, warn=reporting)
    if checkpoint is not None:
        _restore(checkpoint, config, model, optimizer, sparsifier, replica)
        start = resumed_from = checkpoint.step
        log.resume(start)
    model.train()
    trained = replica.wrap(model)

    x_train, y_train = dataset.x_train.to(replica.device), dataset.y_train.to(replica.device)
    bar = progress_bar(console) if reporting else None
    task = bar.add_task("train", total=steps, completed=start, loss=float("nan"), samples_per_s=0.0,
                        sparsity=sparsifier.sparsity()) if bar else None
    saved: Path | None = checkpoint.path if checkpoint is not None else None
    batches: list[torch.Tensor] = []
    recalibrated = 0
    loop_started = time.perf_counter()
    with bar if bar is not None else contextlib.nullcontext():
        for step in range(start, steps):
            tick = time.perf_counter()
            epoch, index = divmod(step, steps_per_epoch)
            if index == 0 or not batches:
                batches = epoch_batches(len(x_train), config.batch_size, epoch, config.seed,
                                        replica.rank, replica.world_size)
            faults.maybe_fail(step, replica.rank)
            batch = batches[index].to(replica.device)
            loss_value = _train_step(step, trained, sparsifier, optimizer, x_train[batch], y_train[batch], replica)
            throughput = config.batch_size / max(time.perf_counter() - tick, 1e-9)
            sparsity = sparsifier.sparsity()
            log.append(step, loss_value, sparsity, throughput)
            if bar is not None and task is not None:
                bar.update(task, completed=step + 1, loss=loss_value, samples_per_s=throughput, sparsity=sparsity)
            done = step + 1
            if done == steps:
                own = recalibration_indices(config, len(x_train), replica.rank, replica.world_size)
                recalibrated = recalibrate_after_pruning(config, model, sparsifier, x_train[own.to(replica.device)])
            if config.checkpoint_dir and (done % config.checkpoint_every == 0 or done == steps):
                log.write()  # first: a log ahead of the checkpoint is trimmed on resume, one behind would leave a gap
                saved = _save(config, done, model, optimizer, sparsifier, replica, loaded.name, steps)
    log_path, plot_path = log.write(), log.plot()
    model.eval()
    finished = time.perf_counter()
    trained_steps = steps - start
    return TrainResult(
        config=config,
        steps=steps,
        losses=log.losses,
        sparsity=sparsifier.sparsity(),
        model=model,
        masks={name: mask.cpu() for name, mask in sparsifier.masks.items()},
        world_size=replica.world_size,
        checkpoint=saved,
        log=log_path,
        plot=plot_path,
        seconds=finished - started,
        samples_per_s=trained_steps * config.batch_size / (finished - loop_started) if trained_steps else 0.0,
        resumed_from=resumed_from,
        layer_sparsity=sparsifier.layer_sparsity(),
        recalibrated_norms=recalibrated,
    )


def _train_step(
    step: int,
    trained: nn.Module,
    sparsifier: Sparsifier,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    replica: Replica,
) -> float:
    """One optimizer step with masks held; returns the loss of the global batch.

    Masks are updated (and checked across ranks) before the forward pass, gradients of pruned
    weights are zeroed before the optimizer sees them, and weights are re-zeroed after it moved
    them (momentum, weight decay)."""
    sparsifier.update(step)
    if sparsifier.schedule.is_update_step(step):
        faults.maybe_corrupt_masks(sparsifier.masks, replica.rank)
        replica.check_masks(sparsifier.masks, step)
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(trained(x), y)
    loss.backward()
    sparsifier.mask_gradients()
    optimizer.step()
    sparsifier.apply()
    return float(replica.mean(loss.detach()).item())


def resume_point(config: TrainConfig, warn: bool = True) -> Checkpoint | None:
    """The checkpoint ``--resume`` continues from: the newest intact one (a damaged newer one is
    named on stderr when ``warn``: one rank says it for all). None yet (first attempt of a
    restartable run) means a fresh start, so one torchrun command line serves the first run and
    every restart."""
    if not config.resume or config.checkpoint_dir is None:
        return None
    checkpoint = newest_intact_checkpoint(config.checkpoint_dir, _warn if warn else lambda _message: None)
    if checkpoint is None:
        return None
    saved = checkpoint.meta.get("config", {})
    current = config.to_dict()
    for key in RESUME_KEYS:
        if key in saved and saved[key] != current[key]:
            raise CtkError(
                f"--resume: checkpoint {checkpoint.path} was trained with {key}={saved[key]!r}, "
                f"this run has {key}={current[key]!r}; use the same options or another --checkpoint-dir"
            )
    return checkpoint


def _warn(message: str) -> None:
    print(f"ctk: warning: {message}", file=sys.stderr, flush=True)


def _restore(
    checkpoint: Checkpoint,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: Sparsifier,
    replica: Replica,
) -> None:
    source = f"checkpoint {checkpoint.path}"
    try:
        model.load_state_dict(checkpoint.model_state, strict=True)
        optimizer.load_state_dict(checkpoint.optimizer_state)
    except (RuntimeError, ValueError, KeyError) as error:
        raise CtkError(f"{source} does not fit --model {config.model!r}: {summary(error)}") from error
    sparsifier.load_state_dict(checkpoint.sparsifier_state, source=source)
    # Per-rank RNG streams only carry over to the same number of ranks; otherwise the seeds stand.
    states = {name: s for name, s in checkpoint.rng.items() if isinstance(s, torch.Tensor)}
    if "torch" in states and states["torch"].shape[0] == replica.world_size:
        torch.set_rng_state(states["torch"][replica.rank].clone())
        if "cuda" in states and replica.device.type == "cuda":
            torch.cuda.set_rng_state(states["cuda"][replica.rank].clone(), replica.device)


def _save(
    config: TrainConfig,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: Sparsifier,
    replica: Replica,
    name: str,
    steps: int,
) -> Path | None:
    """All ranks gather RNG states; rank 0 writes. Returns the step folder (None off rank 0)."""
    rng = replica.gather_rng()
    if replica.rank != 0:
        return None
    meta = {
        "model": name,
        "steps": steps,
        "world_size": replica.world_size,
        "sparsity": sparsifier.sparsity(),
        "config": config.to_dict(),
    }
    state = sparsifier.state_dict()
    return save_checkpoint(
        config.checkpoint_dir,  # type: ignore[arg-type]
        step=step,
        model_state={k: v.detach().cpu() for k, v in model.state_dict().items()},
        optimizer_state=optimizer.state_dict(),
        sparsifier_state=state,
        rng=rng,
        meta=meta,
    )

