#!/usr/bin/env python3
"""Cost of sparse training: a training step with masks and gradual pruning against a dense step.

Two copies of the default digits model train on the same batches in one process: the dense one
with a plain step (forward, backward, Adam), the sparse one with the Sparsifier's extra work
(``update`` on the Zhu & Gupta schedule, which re-computes magnitude masks every ``--frequency``
steps; ``mask_gradients`` after backward; ``apply`` after the optimizer step). Each round times
``--steps`` steps of both, alternating which goes first (this machine favours whichever runs
second); the target is a median overhead of at most 5%.

Reported: the median of per-round sparse/dense ratios (a typical step), the ratio of total times
(mask updates included, amortised over ``--frequency``), and the time of one mask update.

    .venv/bin/python tools/bench_sparse_training.py [--rounds 40] [--steps 10] [--frequency 50]
        [--sparsity 0.8] [--batch 64] [--threads 1] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from compile_toolkit.models import load_digits_dataset, load_model
from compile_toolkit.pruning import GradualSchedule, Sparsifier

TARGET_OVERHEAD = 0.05


class Trainer:
    """One model and its optimizer; ``sparsifier`` None trains densely."""

    def __init__(self, sparsifier_schedule: GradualSchedule | None) -> None:
        self.model = load_model().module.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.loss_fn = nn.CrossEntropyLoss()
        self.sparsifier = Sparsifier(self.model, sparsifier_schedule) if sparsifier_schedule else None
        self.step_index = 0
        self.update_seconds: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step; returns the loss (``item()`` also waits for the step to finish)."""
        if self.sparsifier is not None:
            started = time.perf_counter()
            self.sparsifier.update(self.step_index)  # mask work only at the schedule's update steps
            if self.sparsifier.schedule.is_update_step(self.step_index):
                self.update_seconds.append(time.perf_counter() - started)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        if self.sparsifier is not None:
            self.sparsifier.mask_gradients()
        self.optimizer.step()
        if self.sparsifier is not None:
            self.sparsifier.apply()
        self.step_index += 1
        return loss.item()


def timed(run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def bench(args: argparse.Namespace) -> dict:
    """Alternate dense and sparse rounds of ``args.steps`` steps over the same batches."""
    dataset = load_digits_dataset()
    total = (args.rounds + 1) * args.steps  # +1: the warm-up round
    schedule = GradualSchedule(final_sparsity=args.sparsity, start_step=0, end_step=total - 1, frequency=args.frequency)
    dense, sparse = Trainer(None), Trainer(schedule)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(dataset.x_train), (args.batch,), generator=generator) for _ in range(total)]

    def steps(trainer: Trainer, first: int) -> Callable[[], None]:
        return lambda: [trainer.step(dataset.x_train[b], dataset.y_train[b]) for b in batches[first:first + args.steps]]

    timed(steps(dense, 0))  # warm-up: allocator, Adam state, first mask update
    timed(steps(sparse, 0))
    dense_s, sparse_s = [], []
    for round_index in range(1, args.rounds + 1):
        first = round_index * args.steps
        if round_index % 2:
            dense_s.append(timed(steps(dense, first)))
            sparse_s.append(timed(steps(sparse, first)))
        else:
            sparse_s.append(timed(steps(sparse, first)))
            dense_s.append(timed(steps(dense, first)))
    ratios = [s / d for s, d in zip(sparse_s, dense_s, strict=True)]
    return {
        "rounds": args.rounds, "steps": args.steps, "frequency": args.frequency, "batch": args.batch,
        "dense_step_ms": 1000 * statistics.median(dense_s) / args.steps,
        "sparse_step_ms": 1000 * statistics.median(sparse_s) / args.steps,
        "median_overhead": statistics.median(ratios) - 1,
        "total_overhead": sum(sparse_s) / sum(dense_s) - 1,
        "mask_updates": len(sparse.update_seconds),
        "mask_update_ms": 1000 * statistics.median(sparse.update_seconds),
        "final_sparsity": sparse.sparsifier.sparsity(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="alternating timed rounds")
    parser.add_argument("--steps", type=int, default=10, help="training steps per model per round")
    parser.add_argument("--frequency", type=int, default=50, help="steps between mask updates")
    parser.add_argument("--sparsity", type=float, default=0.8, help="final sparsity of the gradual schedule")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if min(args.rounds, args.steps, args.frequency, args.batch, args.threads) < 1 or not 0 <= args.sparsity < 1:
        parser.error("--rounds, --steps, --frequency, --batch, --threads must be >= 1 and --sparsity in [0, 1)")
    torch.set_num_threads(args.threads)
    console = Console()
    with console.status("timing dense and sparse steps"):
        result = bench(args)
    table = Table(title=f"digits-resnet training step, batch {args.batch}: dense vs masks + gradual pruning to "
                        f"{args.sparsity:.0%} (updates every {args.frequency} steps); {args.rounds} alternating "
                        f"rounds of {args.steps} steps")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("dense step, median", f"{result['dense_step_ms']:.2f} ms")
    table.add_row("sparse step, median", f"{result['sparse_step_ms']:.2f} ms")
    verdict = "within" if result["median_overhead"] <= TARGET_OVERHEAD else "OVER"
    table.add_row("overhead, median of per-round ratios", f"{result['median_overhead']:+.1%} ({verdict} the 5% target)")
    table.add_row("overhead, total time (mask updates included)", f"{result['total_overhead']:+.1%}")
    table.add_row("one mask update, median", f"{result['mask_update_ms']:.2f} ms ({result['mask_updates']} updates)")
    table.add_row("sparsity reached", f"{result['final_sparsity']:.1%}")
    console.print(table)
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(path)


if __name__ == "__main__":
    main()
