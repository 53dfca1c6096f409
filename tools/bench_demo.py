#!/usr/bin/env python3
"""Benchmark of the main job: wall time of ``ctk export --pruned`` (after set-up) and the
stripped model's ONNX Runtime speedup over the dense one.

The job runs in fresh processes, as ``make demo`` does; its median wall time is reported. Then
dense and stripped ONNX models are timed in the same process with alternating order (A B, B A,
...; this machine favours whichever runs second) and the median of per-round ratios is printed,
at batch 1 and batch 8.

    .venv/bin/python tools/bench_demo.py [--runs 3] [--rounds 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from compile_toolkit.metrics import compare_latency_ms
from compile_toolkit.models import load_digits_dataset


def time_job(out: Path) -> float:
    ctk = Path(sys.executable).parent / "ctk"
    started = time.perf_counter()
    subprocess.run([str(ctk), "export", "--pruned", "--out", str(out)], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="how many times to run the job")
    parser.add_argument("--rounds", type=int, default=60, help="alternating latency rounds per batch size")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        walls = []
        for run in range(args.runs):
            walls.append(time_job(Path(tmp) / f"run{run}"))
            console.print(f"run {run + 1}/{args.runs}: {walls[-1]:.1f} s")
        out = Path(tmp) / f"run{args.runs - 1}"
        report = json.loads((out / "report.json").read_text())
        images = load_digits_dataset().x_test
        latency = {
            batch: compare_latency_ms(str(out / "dense" / "model.onnx"), str(out / "model.onnx"), (images[:batch],), rounds=args.rounds)
            for batch in (1, 8)
        }
    table = Table(title=f"ctk export --pruned on digits-resnet ({args.runs} runs, {args.rounds} latency rounds)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("job wall time, median", f"{statistics.median(walls):.1f} s")
    table.add_row("job wall time, min / max", f"{min(walls):.1f} / {max(walls):.1f} s")
    dense, stripped = report["dense"], report["stripped"]
    table.add_row("params dense / stripped", f"{dense['params']:,} / {stripped['params']:,} ({dense['params'] / stripped['params']:.2f}x)")
    table.add_row("FLOPs ratio dense / stripped", f"{dense['flops'] / stripped['flops']:.2f}x")
    for batch, timing in latency.items():
        table.add_row(
            f"ORT latency batch {batch}: dense / stripped",
            f"{timing['a_ms']:.3f} / {timing['b_ms']:.3f} ms, speedup {timing['ratio']:.2f}x",
        )
    table.add_row(
        "test accuracy dense / pruned+fine-tuned / stripped",
        f"{dense['accuracy']:.2%} / {report['pruning']['accuracy']:.2%} / {stripped['accuracy']:.2%}",
    )
    console.print(table)


if __name__ == "__main__":
    main()
