#!/usr/bin/env python3
"""Where a pruned model runs fastest: ONNX Runtime and OpenVINO, dense and stripped, fp32 and int8.

A torchvision model (random weights) has 50% of every coupled channel group pruned (L1) and is
stripped; the dense and the stripped model are exported by ``ctk.export`` to ``model.onnx`` and
``openvino/model.xml``, and quantized to int8 (static QDQ, per-channel; the IR from the QDQ file),
every artifact verified in its runtime. The eight models are then timed together at batch 1 and 8
(:mod:`compile_toolkit.runtimes_report`, as ``ctk export --formats openvino`` does): blocks of runs
after an untimed run, the order flipped every round, each speedup the median of per-round ratios
to dense fp32 in ONNX Runtime. Calibration uses seeded normal images: with random weights the
numbers say how fast, not how accurate.

    .venv/bin/python tools/bench_runtimes.py [--model resnet50] [--image-size 224] [--rounds 8]
        [--budget-s 120] [--json results.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import compile_toolkit as ctk
from compile_toolkit.quantize import OrtAuto
from compile_toolkit.runtimes_report import section

NO_LIMIT = OrtAuto(max_metric_drop=None)  # random weights: no accuracy to hold


def measure(model_name: str, size: int, rounds: int, budget_s: float, folder: Path) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    example = (torch.randn(2, 3, size, size),)
    calibration = [(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    options = {"formats": ("onnx", "openvino"), "quantize": NO_LIMIT, "calibration": calibration}
    dense = ctk.export(model, example, str(folder / "dense"), **options)
    ctk.prune(model, example, sparsity=0.5, structure="channel")
    stripped = ctk.strip(model, example)
    artifacts = ctk.export(stripped, example, str(folder), reference=model, **options)
    return {"model": model_name, "image_size": size,
            **section(artifacts, dense, folder, example, None, rounds, budget_s)}


def table(result: dict) -> Table:
    batches = result["batches"]
    out = Table(title=f"{result['model']} at 50% channels, {result['image_size']}px: speedup over dense fp32 in ORT")
    for column in ("model", "precision", "runtime", *(f"batch {b}" for b in batches)):
        out.add_column(column, justify="right" if column.startswith("batch") else "left")
    for entry in result["models"].values():
        out.add_row(entry["model"], entry["precision"], entry["runtime"],
                    *(f"{entry[f'speedup_batch{b}']:.2f}x ({entry[f'latency_ms_batch{b}']:.2f} ms)" for b in batches))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision classifier")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=8, help="alternated rounds per batch size")
    parser.add_argument("--budget-s", type=float, default=300.0, help="at most this long per batch size")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="resnet18 at 64px, 2 rounds: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.model, args.image_size, args.rounds = "resnet18", 64, 2
    with tempfile.TemporaryDirectory() as folder:
        result = measure(args.model, args.image_size, args.rounds, args.budget_s, Path(folder))
    Console().print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
