"""What a training run shows and leaves behind: a live bar, a per-step JSON log and a plot.

Only one process (rank 0) reports, so every strategy builds these objects on its reporting rank
and passes ``None`` elsewhere. The log is rewritten atomically at each checkpoint, so after a
crash and ``--resume`` it continues from the checkpoint's step with no gap and no duplicates.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import CtkError, summary
from ..fileio import staged_path, write_atomic

LOG_FILE = "metrics.json"
PLOT_FILE = "metrics.png"

StepProgress = Callable[[int, int, float, float], None]
"""Told after every optimizer step: (steps done, total steps, loss, samples per second)."""


class StepLog:
    """Per-step metrics (loss, sparsity, throughput, learning rate) and the task's metric at each
    evaluation, in memory, written as JSON and a PNG plot."""

    def __init__(self, folder: str | os.PathLike | None, meta: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.meta = dict(meta or {})
        self.steps: list[dict[str, float]] = []
        self.evaluations: list[dict[str, float]] = []

    def append(self, step: int, loss: float, sparsity: float, samples_per_s: float, lr: float | None = None) -> None:
        """Record the metrics of optimizer step ``step`` (0-based)."""
        entry = {"step": step, "loss": float(loss), "sparsity": float(sparsity), "samples_per_s": float(samples_per_s)}
        if lr is not None:
            entry["lr"] = float(lr)
        self.steps.append(entry)

    def evaluate(self, done: int, metrics: dict[str, float]) -> None:
        """Record the validation metrics measured after ``done`` steps."""
        self.evaluations.append({"step": done, **{name: float(value) for name, value in metrics.items()}})

    def resume(self, step: int) -> None:
        """Reload the log written so far and keep what came before ``step`` (what a checkpoint holds)."""
        if self.folder is None or not (self.folder / LOG_FILE).is_file():
            return
        path = self.folder / LOG_FILE
        try:
            previous = json.loads(path.read_text())
            self.steps = [entry for entry in previous["steps"] if entry["step"] < step]
            self.evaluations = [entry for entry in previous.get("evaluations", []) if entry["step"] <= step]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CtkError(f"training log {path} is not a valid metrics log: {summary(error)}") from error

    @property
    def losses(self) -> list[float]:
        return [entry["loss"] for entry in self.steps]

    def write(self) -> Path | None:
        """Write ``metrics.json`` atomically; returns its path (None without a folder)."""
        if self.folder is None:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOG_FILE
        log = {"meta": self.meta, "steps": self.steps, "evaluations": self.evaluations}
        write_atomic(path, json.dumps(log, indent=1).encode())
        return path

    def plot(self) -> Path | None:
        """Plot loss and sparsity against the step into ``metrics.png``; returns its path."""
        if self.folder is None or not self.steps:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [entry["step"] for entry in self.steps]
        metric = self._metric_name()
        figure, axes = plt.subplots(2 if metric else 1, 1, figsize=(7, 6 if metric else 4), sharex=True, squeeze=False)
        loss_axis = axes[0][0]
        loss_axis.plot(steps, self.losses, color="tab:blue", label="loss")
        loss_axis.set_ylabel("training loss", color="tab:blue")
        sparsity_axis = loss_axis.twinx()
        sparsity_axis.plot(steps, [e["sparsity"] for e in self.steps], color="tab:red", label="sparsity")
        sparsity_axis.set_ylabel("sparsity", color="tab:red")
        sparsity_axis.set_ylim(0, 1)
        if metric:
            metric_axis = axes[1][0]
            metric_axis.plot([e["step"] for e in self.evaluations], [e[metric] for e in self.evaluations],
                             marker="o", color="tab:green")
            metric_axis.set_ylabel(f"validation {metric}")
        axes[-1][0].set_xlabel("step")
        figure.suptitle(str(self.meta.get("title", "sparse training")))
        figure.tight_layout()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / PLOT_FILE
        try:
            with staged_path(path) as tmp:
                figure.savefig(tmp, dpi=100, format="png")
        finally:
            plt.close(figure)
        return path

    def _metric_name(self) -> str | None:
        """The task's headline metric in the evaluations (top1, perplexity or cosine), if any."""
        for name in ("top1", "perplexity", "cosine"):
            if self.evaluations and all(name in e for e in self.evaluations):
                return name
        return None


def progress_bar(console: Console | None = None, sparsity: bool = True) -> Progress:
    """A rich bar per task (named by its description): steps done of total, loss, throughput and,
    with ``sparsity``, the current sparsity.

    Update with ``progress.update(task, completed=step, loss=..., samples_per_s=..., sparsity=...)``;
    the task needs those fields set when it is added.
    """
    columns = [
        TextColumn("[bold]{task.description}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[samples_per_s]:.0f} samples/s"),
    ]
    if sparsity:
        columns.append(TextColumn("sparsity {task.fields[sparsity]:.1%}"))
    return Progress(*columns, TimeRemainingColumn(), console=console or Console(stderr=True), transient=False)


@contextlib.contextmanager
def phase_bars(console: Console | None = None) -> Iterator[Callable[[str], StepProgress]]:
    """Bars for a job that trains in phases (``ctk prune``: penalised training, each round of
    iterative pruning, fine-tuning), so no long step runs silent: ``phase(name)`` adds a bar
    named ``name`` and returns the :data:`StepProgress` that moves it."""
    bar = progress_bar(console, sparsity=False)

    def phase(name: str) -> StepProgress:
        task = bar.add_task(name, total=None, loss=math.nan, samples_per_s=0.0)

        def update(done: int, total: int, loss: float, samples_per_s: float) -> None:
            bar.update(task, total=total, completed=done, loss=loss, samples_per_s=samples_per_s)

        return update

    with bar:
        yield phase

