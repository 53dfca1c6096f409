#!/usr/bin/env python3
"""Every torchvision classifier, pruned, stripped twice: ``ctk.strip`` on the PyTorch model and
``ctk.strip_onnx`` on its ONNX file; does the ONNX strip reach as far (issue 22: within 1%)?

For each model, as ``tests/test_zoo.py`` builds it (``zoo_models``: seeded random weights, the
smallest input it takes): ``ctk.prune(sparsity=0.4, structure="channel")`` zeroes channel groups;
``ctk.strip`` strips the PyTorch model; ``torch.onnx.export`` (TorchScript exporter, batch norms
unfused, dynamic batch) writes the pruned model with its zeros, and ``ctk.strip_onnx`` strips that
file (verified in ONNX Runtime against it). Then one row: parameters dense / after ``ctk.strip`` /
after the ONNX strip (initializer elements; the PyTorch counts add batch-norm running statistics,
which the file holds as initializers too), their difference, whether the stripped file is exact
(the strip's own verification, and again here at batch 3 against the input file: 1e-5 of the
output's magnitude), and the ops without a channel rule the ONNX strip met.

Each model runs in its own process, stopped after ``--timeout`` seconds (default 60): such a row
says "skipped: over 60 s" rather than waiting on the largest models.

    nice -n 10 .venv/bin/python tools/sweep_onnx_strip.py [--models resnet18,swin_v2_t]
                                                          [--timeout 60] [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo_models import (  # noqa: E402 - the zoo test builds, feeds and exports the same models
    barrier_ops,
    build,
    export_onnx,
    input_side,
    weights_as_onnx_holds_them,
)

SPARSITY = 0.4
TOLERANCE = 1e-5  # the ONNX strip's verification: max |stripped - input file| over max |input file|
OTHER_BATCH = 3  # the strip verifies at the batch of its sample; the sweep checks another one


def side_of(name: str) -> int:
    """The input side for both strips: the zoo test's, except where the TorchScript exporter needs
    a larger one (it writes adaptive_avg_pool2d only where the output size divides the input's:
    AlexNet's 6 x 6 and VGG's 7 x 7 pools need 224 x 224 inputs)."""
    return 224 if name == "alexnet" or name.startswith("vgg") else input_side(name)


@dataclass
class Row:
    model: str
    status: str  # ok, FAIL or skipped
    side: int = 0
    dense: int = 0
    ctk_strip: int = 0
    onnx_strip: int = 0
    exact: bool = False
    error: float | None = None  # the worse of the verification's and the other batch's
    barriers: list[str] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0

    @property
    def difference(self) -> float | None:
        """ONNX strip over ``ctk.strip``, minus 1 (positive: the file kept more)."""
        return self.onnx_strip / self.ctk_strip - 1 if self.ctk_strip and self.onnx_strip else None


def measure(name: str) -> Row:
    import compile_toolkit as ctk

    model = build(name)
    side = side_of(name)
    x = torch.randn(2, 3, side, side)
    started = time.perf_counter()
    ctk.prune(model, (x,), sparsity=SPARSITY, structure="channel")
    row = Row(model=name, status="ok", side=side, dense=weights_as_onnx_holds_them(model))
    row.ctk_strip = weights_as_onnx_holds_them(ctk.strip(model, (x,)))
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "pruned.onnx", Path(tmp) / "small.onnx"
        export_onnx(model, x, source)
        summary = ctk.strip_onnx(source, out, latency=False)
        row.onnx_strip = summary.parameters_after
        row.barriers = barrier_ops(summary.barriers)
        row.error = max(summary.max_relative_error, other_batch_error(source, out, side))
    row.exact = row.error <= TOLERANCE
    row.seconds = time.perf_counter() - started
    if not row.exact:
        row.status, row.reason = "FAIL", f"relative error {row.error:.1e}"
    return row


def other_batch_error(source: Path, stripped: Path, side: int) -> float:
    """max |stripped - source| / max |source| in ONNX Runtime at batch ``OTHER_BATCH``."""
    import onnxruntime

    x = np.random.default_rng(3).standard_normal((OTHER_BATCH, 3, side, side)).astype(np.float32)
    outputs = [onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
               for p in (source, stripped)]
    return float(np.abs(outputs[1] - outputs[0]).max() / np.abs(outputs[0]).max())


def run_one(name: str, timeout: float) -> Row:
    """``measure`` in a fresh process (a crash or a hang costs one row)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, __file__, "--worker", name, "--out", str(out)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Row(model=name, status="skipped", side=side_of(name), reason=f"over {timeout:.0f} s",
                       seconds=timeout)
        if not out.exists():
            tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            return Row(model=name, status="FAIL", side=side_of(name), reason=tail[:160],
                       seconds=time.perf_counter() - started)
        return Row(**json.loads(out.read_text()))


def worker(name: str, out: str) -> None:
    from compile_toolkit.errors import summary

    torch.set_num_threads(1)
    try:
        row = measure(name)
    except Exception as error:  # noqa: BLE001 - a failing model is a row, not the end of the sweep
        row = Row(model=name, status="FAIL", side=side_of(name), reason=summary(error)[:160])
    Path(out).write_text(json.dumps(asdict(row)))


def millions(count: int) -> str:
    return f"{count / 1e6:.3f}" if count else ""


def print_table(rows: list[Row]) -> None:
    print("| model | input | dense M | ctk.strip M | ONNX strip M | difference | exact | ONNX barriers / why not |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        difference = "" if r.difference is None else f"{100 * r.difference:+.2f}%"
        exact = "" if r.status == "skipped" or not r.onnx_strip else "yes" if r.exact else "no"
        note = ", ".join(r.barriers) if r.status == "ok" else f"{r.status}: {r.reason}"
        print(f"| {r.model} | {r.side} | {millions(r.dense)} | {millions(r.ctk_strip)} | {millions(r.onnx_strip)} "
              f"| {difference} | {exact} | {note} |")
    measured = [r for r in rows if r.difference is not None]
    within = sum(abs(r.difference) <= 0.01 for r in measured)
    print(f"\n{len(measured)} models measured, {within} within 1% of ctk.strip, "
          f"{sum(r.exact for r in measured)} exact; {sum(r.status == 'skipped' for r in rows)} skipped, "
          f"{sum(r.status == 'FAIL' for r in rows)} failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names (default: every classification model)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per model (default 60)")
    parser.add_argument("--json", help="also write the rows here, after every model")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out)
        return
    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    rows = []
    for i, name in enumerate(names):
        rows.append(run_one(name, args.timeout))
        r = rows[-1]
        print(f"[{i + 1}/{len(names)}] {name}: {r.status} {r.reason} ({r.seconds:.0f} s)", file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
