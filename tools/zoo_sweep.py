#!/usr/bin/env python3
"""Prune and strip every torchvision classification model, and show what strip removed.

For each model (random weights, eval mode, seeded): ``ctk.prune(sparsity=0.4, structure="channel")``,
then ``ctk.strip``, then one row: channel groups found and stripped, the ops without a channel rule
that were barriers, the ops with a rule that still kept some channels ("kept by"), parameter and FLOP
ratios (stripped / dense), the max relative error of the stripped model against
the pruned one on two random inputs (relative to the output's max magnitude; must be <= 1e-4),
whether the ONNX export verified in ONNX Runtime, and the seconds ``ctk.strip`` spent in analysis
+ strip and in ``torch.export``. Each model runs in its own process with a timeout, so a crash, an
out-of-memory kill or a hang costs one row, not the sweep. A model is skipped only when
``torch.export`` cannot capture it, and the row says why.

    .venv/bin/python tools/zoo_sweep.py [--models resnet50,densenet201] [--json out.json]
                                        [--size 224] [--timeout 1800]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch.utils._pytree import tree_leaves

import compile_toolkit as ctk
from compile_toolkit import capture as capture_module
from compile_toolkit.errors import summary
from compile_toolkit.metrics import count_flops, count_params
from compile_toolkit.passes.strip import StripPass

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo_models import barrier_ops, build  # noqa: E402 - the zoo test builds the same models

SPARSITY = 0.4
TOLERANCE = 1e-4  # max |stripped - pruned| over max |pruned|
FIXED_SIZES = {"inception_v3": 299}  # input sizes a model needs
FIXED_FAMILIES = ("vit_", "swin_", "maxvit_")  # position embeddings / windows made for 224
DEFAULT_SIZE = 128  # enough for every convnet here, and every layer keeps a real spatial extent


def classification_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def input_size(name: str, size: int | None = None) -> int:
    """The image size the sweep feeds ``name``: its required size, else ``size`` or the default."""
    if name in FIXED_SIZES:
        return FIXED_SIZES[name]
    if name.startswith(FIXED_FAMILIES):
        return 224
    return size or DEFAULT_SIZE


@dataclass
class Row:
    """One model's results; ``status`` is ``ok``, ``FAIL``, ``skip`` or ``timeout``."""

    model: str
    status: str
    size: int = 0
    reason: str = ""
    groups: int = 0
    groups_stripped: int = 0
    channels_removed: int = 0
    barrier_ops: list[str] = field(default_factory=list)
    limiting_ops: list[str] = field(default_factory=list)
    kept_because: list[str] = field(default_factory=list)
    params: int = 0
    params_stripped: int = 0
    flops: int = 0
    flops_stripped: int = 0
    max_rel_error: float | None = None
    onnx: str = ""
    onnx_max_error: float | None = None
    prune_s: float = 0.0
    strip_s: float = 0.0  # analysis + strip pass inside ctk.strip
    export_s: float = 0.0  # torch.export inside ctk.strip
    wall_s: float = 0.0

    @property
    def params_ratio(self) -> float | None:
        return self.params_stripped / self.params if self.params else None

    @property
    def flops_ratio(self) -> float | None:
        return self.flops_stripped / self.flops if self.flops else None


# -- one model (in a worker process) --------------------------------------------------------

@contextmanager
def timed(owner: object, attr: str, totals: dict[str, float], key: str,
          on_error: Callable[[Exception], None] | None = None) -> Iterator[None]:
    """Add the wall time of every call of ``owner.attr`` to ``totals[key]`` inside the block."""
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        except Exception as error:
            if on_error is not None:
                on_error(error)
            raise
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - start

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, original)


def relative_error(reference: object, candidate: object) -> float:
    """max |a - b| / max |a| over the tensors of two outputs."""
    worst = 0.0
    for a, b in zip(tree_leaves(reference), tree_leaves(candidate), strict=True):
        if a.shape != b.shape:
            return float("inf")
        worst = max(worst, ((a.double() - b.double()).abs().max() / a.abs().max().clamp_min(1e-12)).item())
    return worst


def limiting_ops(reasons: list[str]) -> list[str]:
    """The ops that have a rule but kept some channels alive (a LayerNorm's normalised dim, a
    view that merges dims it cannot follow), without the ``aten.`` prefix."""
    return sorted({m.group(1).removeprefix("aten.") for r in reasons
                   if not r.startswith("no channel rule") and (m := re.search(r"(\S+) at node", r))})


def measure(name: str, size: int | None = None) -> Row:
    """Prune ``name`` at 0.4, strip it, and measure the result (raises on any failure)."""
    model = build(name)
    side = input_size(name, size)
    x = torch.randn(2, 3, side, side)
    row = Row(model=name, status="ok", size=side)
    started = time.perf_counter()
    ctk.prune(model, (x,), sparsity=SPARSITY, structure="channel")
    row.prune_s = time.perf_counter() - started
    totals: dict[str, float] = {}
    with timed(capture_module, "_export", totals, "export"), timed(StripPass, "__call__", totals, "strip"):
        stripped = ctk.strip(model, (x,))
    row.strip_s, row.export_s = totals["strip"], totals["export"]
    details = ctk.strip_summary(stripped)
    row.groups = len(details.groups)
    row.groups_stripped = sum(g.kept < g.channels for g in details.groups)
    row.channels_removed = details.channels_removed
    row.kept_because = details.barriers
    row.barrier_ops = barrier_ops(details.barriers)
    row.limiting_ops = limiting_ops(details.barriers)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        checks = [torch.randn(x.shape, generator=generator) for _ in range(2)]
        row.max_rel_error = max(relative_error(model(c), stripped(c)) for c in checks)
    row.params, row.params_stripped = count_params(model), count_params(stripped)
    row.flops, row.flops_stripped = count_flops(model, (x,)), count_flops(stripped, (x,))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            (artifact,) = ctk.export(stripped, (x,), os.path.join(tmp, "out"), formats=("onnx",), reference=model)
            row.onnx, row.onnx_max_error = "ok", artifact.max_abs_error
        except ctk.CtkError as error:
            row.onnx = summary(error)
    row.wall_s = time.perf_counter() - started
    if not row.max_rel_error <= TOLERANCE or row.onnx != "ok":
        row.status = "FAIL"
        row.reason = "outputs changed" if not row.max_rel_error <= TOLERANCE else f"onnx: {row.onnx}"
    return row


def run_worker(name: str, size: int | None, threads: int, out: str) -> None:
    """Measure one model and write its row as JSON; a failure is a row too."""
    torch.set_num_threads(threads)
    failed_export: list[Exception] = []
    totals: dict[str, float] = {}
    started = time.perf_counter()
    try:
        with timed(capture_module, "_export", totals, "any", on_error=failed_export.append):
            row = measure(name, size)
    except Exception as error:
        skipped = any(error is e or error.__cause__ is e for e in failed_export)
        row = Row(model=name, status="skip" if skipped else "FAIL", size=input_size(name, size),
                  reason=summary(error), wall_s=time.perf_counter() - started)
    Path(out).write_text(json.dumps(asdict(row)))


# -- the sweep (parent process) --------------------------------------------------------------

def run_one(name: str, size: int | None, threads: int, timeout: float) -> Row:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        command = [sys.executable, __file__, "--worker", name, "--out", out, "--threads", str(threads)]
        if size:
            command += ["--size", str(size)]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Row(model=name, status="timeout", size=input_size(name, size),
                       reason=f"no result after {timeout:.0f} s", wall_s=timeout)
        if not os.path.exists(out):
            tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            return Row(model=name, status="FAIL", size=input_size(name, size),
                       reason=f"worker died (exit status {done.returncode}): {tail}",
                       wall_s=time.perf_counter() - started)
        return Row(**json.loads(Path(out).read_text()))


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def table(rows: list[Row], threads: int) -> Table:
    out = Table(title=f"torchvision zoo: prune {SPARSITY} (channel) then strip; "
                      f"{os.cpu_count()} cores, {threads} torch thread(s)")
    for column, justify in [("model", "left"), ("input", "right"), ("groups", "right"), ("stripped", "right"),
                            ("barrier ops", "left"), ("kept by", "left"), ("params", "right"), ("FLOPs", "right"),
                            ("max rel err", "right"), ("ONNX", "left"), ("strip s", "right"),
                            ("export s", "right"), ("status", "left")]:
        out.add_column(column, justify=justify, overflow="fold")
    for r in rows:
        if r.status in ("ok", "FAIL") and r.groups:
            out.add_row(r.model, str(r.size), str(r.groups), str(r.groups_stripped), ", ".join(r.barrier_ops),
                        ", ".join(r.limiting_ops), _ratio(r.params_ratio), _ratio(r.flops_ratio),
                        "" if r.max_rel_error is None else f"{r.max_rel_error:.1e}", r.onnx,
                        f"{r.strip_s:.2f}", f"{r.export_s:.1f}", r.status if not r.reason else f"{r.status}: {r.reason}")
        else:
            out.add_row(r.model, str(r.size), *[""] * 10, f"{r.status}: {r.reason}")
    done = [r for r in rows if r.status == "ok"]
    counts = ", ".join(f"{sum(r.status == s for r in rows)} {s}" for s in ("ok", "FAIL", "skip", "timeout"))
    out.add_section()
    out.add_row(f"total ({len(rows)})", "", str(sum(r.groups for r in done)), str(sum(r.groups_stripped for r in done)),
                f"{sum(bool(r.barrier_ops) for r in done)} models with barriers", "",
                _ratio(_mean([r.params_ratio for r in done])), _ratio(_mean([r.flops_ratio for r in done])),
                "", f"{sum(r.onnx == 'ok' for r in rows)} ok", f"{sum(r.strip_s for r in rows):.1f}",
                f"{sum(r.export_s for r in rows):.1f}", counts)
    return out


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names (default: every classification model)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--size", type=int, help=f"image size for models that take any (default {DEFAULT_SIZE})")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model (default 1800)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads per model (default 1: on a shared machine, OpenMP's "
                             "spin-waiting makes a second thread 10-100x slower when the cores are busy)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.size, args.threads, args.out)
        return
    names = args.models.split(",") if args.models else classification_models()
    unknown = sorted(set(names) - set(classification_models()))
    if unknown:
        parser.error(f"not torchvision classification models: {', '.join(unknown)}")
    console = Console(width=None if sys.stdout.isatty() else 240)
    rows = []
    for i, name in enumerate(names):
        rows.append(run_one(name, args.size, args.threads, args.timeout))
        r = rows[-1]
        console.print(f"[{i + 1}/{len(names)}] {name}: {r.status} {r.reason} ({r.wall_s:.0f} s)", highlight=False)
        if args.json:  # after every model, so a long sweep leaves its rows behind if stopped
            Path(args.json).write_text(json.dumps(
                {"torch": torch.__version__, "torchvision": torchvision.__version__, "cores": os.cpu_count(),
                 "threads": args.threads,
                 "sparsity": SPARSITY, "rows": [asdict(r) | {"params_ratio": r.params_ratio,
                                                             "flops_ratio": r.flops_ratio} for r in rows]},
                indent=1))
    console.print(table(rows, args.threads))


if __name__ == "__main__":
    main()
