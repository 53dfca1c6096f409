#!/usr/bin/env python3
"""Do widths chosen by measured latency run faster than uniform widths at the same FLOPs?

A torchvision model (random weights) is pruned twice and stripped: every coupled channel group at
50% (``ctk.prune``, L1: uniform widths), and each group at the width the latency knapsack chooses
(:mod:`compile_toolkit.latency`) from the per-layer table of a runtime and precision, with the
latency budget bisected until the choice's FLOPs equal the uniform model's (within 2%, checked
with ``torch.utils.flop_counter`` on both stripped models). Each model is exported to ONNX and
quantized to int8 (ONNX Runtime static QDQ via ``compile_toolkit.quantize``; random calibration
images: how fast, not how accurate), then timed in ONNX Runtime and in OpenVINO (which reads the
same files, fp32 pinned), at batch 1 and 8, all models of one batch size in one run
(:func:`~compile_toolkit.metrics.compare_runtimes`: blocks of runs after an untimed run, the order
rotated and flipped every round), each speedup the median of per-round ratios to dense fp32 in
ONNX Runtime. The latency tables are cached (``$CTK_CACHE_DIR``), so a second run only times models.

What the knapsack keeps (``--value``): ``flops`` (the default), each group's FLOPs at each width
with its neighbours at uniform widths, so the choice is the most compute the latency budget buys,
which is the question asked here (random weights have no importance to keep); or ``l1``, the
channels' L1 norms that ``ctk.prune`` ranks by, which keeps as many channels as it can and cuts
the costly high-resolution layers for them.

    .venv/bin/python tools/bench_latency_target.py [--model resnet50] [--image-size 224] [--rounds 8]
        [--runtimes ort,openvino] [--precisions fp32,int8] [--batches 1,8] [--value flops|l1]
        [--json results.json] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.exporters import int8, onnx_format
from compile_toolkit.latency.groups import width_plan
from compile_toolkit.latency.layers import Layer
from compile_toolkit.latency.plan import WidthPlan
from compile_toolkit.latency.table import Cell, LatencyTable
from compile_toolkit.latency.widths import (
    Choice,
    GroupOption,
    LayerCosts,
    WidthChooser,
    table_cells,
    uniform_picks,
)
from compile_toolkit.latency_target import MAX_SPARSITY, WIDTH_POINTS
from compile_toolkit.metrics import compare_runtimes, count_flops
from compile_toolkit.pruning.configs import Channels
from compile_toolkit.pruning.prune_ import PruneData, prune_
from compile_toolkit.quantize import OrtAuto

NO_LIMIT = OrtAuto(max_metric_drop=None)  # random weights: no accuracy to hold
FLOPS_MATCH = 0.02  # the chosen widths' FLOPs within this share of the uniform model's
BISECTIONS = 16  # latency budgets tried to match the FLOPs
FILES = {"fp32": onnx_format.FILENAME, "int8": int8.ONNX_FILENAME}  # what ctk.export writes


@dataclass
class Variant:
    """One stripped (or dense) model: its name, FLOPs per image and ONNX folder."""

    name: str
    flops: int
    folder: Path
    widths: list[int] | None = None


def predicted_flops(plan: WidthPlan, widths: tuple[int, ...]) -> int:
    """FLOPs of the plan's layers at ``widths`` (convolutions and linears: what the counter counts)."""
    return layers_flops(plan.layers, widths, [o.size for o in plan.options])


def layers_flops(layers: list[Layer], widths: Sequence[int], sizes: list[int]) -> int:
    """FLOPs of ``layers`` with each group at its width in ``widths`` (of ``sizes``)."""
    return sum(layer.geometry.flops(layer.cin.width(widths, sizes), layer.cout.width(widths, sizes)) for layer in layers)


def flops_valued(plan: WidthPlan) -> list[GroupOption]:
    """The plan's options valued by FLOPs: each width's value is the FLOPs of the layers the group
    touches at that width, every other group at its uniform 50% width (FLOPs linearised there)."""
    sizes = [o.size for o in plan.options]
    half = [o.widths[j] for o, j in zip(plan.options, uniform_picks(plan.options, 0.5), strict=True)]
    valued = []
    for g, option in enumerate(plan.options):
        layers = [layer for layer in plan.layers if g in layer.groups()]
        values = tuple(float(layers_flops(layers, [*half[:g], width, *half[g + 1:]], sizes)) for width in option.widths)
        valued.append(dataclasses.replace(option, importance=values))
    return valued


def flops_matched(chooser: WidthChooser, plan: WidthPlan, goal: int) -> Choice:
    """The knapsack's choice at the latency budget (bisected) whose FLOPs come nearest ``goal``,
    then brought within half of :data:`FLOPS_MATCH` of it by :func:`nudged`."""
    low, high = chooser.smallest().predicted_ms, chooser.dense().predicted_ms
    best = chooser.choose(high)
    for _ in range(BISECTIONS):
        middle = (low + high) / 2
        choice = chooser.choose(middle)
        flops = predicted_flops(plan, choice.widths)
        if abs(flops - goal) < abs(predicted_flops(plan, best.widths) - goal):
            best = choice
        if flops > goal:
            high = middle
        else:
            low = middle
    return nudged(chooser, plan, best, goal)


def nudged(chooser: WidthChooser, plan: WidthPlan, choice: Choice, goal: int) -> Choice:
    """``choice`` with single groups moved one candidate width (narrower above ``goal``, wider
    below) until its FLOPs are within half of :data:`FLOPS_MATCH` of ``goal``: each time the move
    with the lowest predicted latency among those that stay on the band's near side of the far
    edge, else the one that changes the FLOPs least. Why: the table makes some widths nearly free
    (an int8 kernel's time steps with AMX tiles), so a budget 1% higher can buy 10% more FLOPs,
    and the bisection can end on either side of the band."""
    band = FLOPS_MATCH / 2
    picks = [option.widths.index(width) for option, width in zip(chooser.options, choice.widths, strict=True)]
    flops = predicted_flops(plan, chooser.widths(picks))
    while abs(flops / goal - 1) > band:
        step = -1 if flops > goal else 1
        moves = []
        for g, option in enumerate(chooser.options):
            if 0 <= picks[g] + step < len(option.widths):
                moved = [*picks[:g], picks[g] + step, *picks[g + 1:]]
                moved_flops = predicted_flops(plan, chooser.widths(moved))
                if moved_flops != flops:
                    moves.append((moved_flops, chooser.costs.total(chooser.widths(moved)), moved))
        if not moves:
            break
        inside = [m for m in moves if abs(m[0] / goal - 1) <= band or (m[0] > goal) == (flops > goal)]
        moved_flops, _, moved = (min(inside, key=lambda m: m[1]) if inside
                                 else min(moves, key=lambda m: abs(m[0] - flops)))
        if (moved_flops > goal) != (flops > goal) and abs(moved_flops - goal) >= abs(flops - goal):
            break  # the smallest move jumps past the band: keep the nearer side
        picks, flops = moved, moved_flops
    return chooser.choice(picks)


def measured_alone(runtime: str, precision: str, cells: list[Cell]) -> int:
    """Time the cells the cached table lacks in a process of their own, and return how many.

    Why: measured in one process after three other tables, ResNet-50's OpenVINO int8 cells came
    out 28% slower (median) than measured alone, a third of them more than 20% off (two tables
    measured alone: a fifth), up to 5x (a 3x3 convolution at 28x28, 96 to 128 channels: 0.57 ms
    against 0.11 ms); and the choice follows the cells."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, (runtime, precision, cells))


def _measure(runtime: str, precision: str, cells: list[Cell]) -> int:
    table = LatencyTable(runtime, precision)
    table.ensure(cells)
    return table.measured


def exported(module: nn.Module, reference: nn.Module, example: tuple, calibration: list, folder: Path) -> Path:
    ctk.export(module, example, str(folder), formats=("onnx",), reference=reference, quantize=NO_LIMIT,
               calibration=calibration)
    return folder


def stripped_variant(name: str, model: nn.Module, config: Channels, example: tuple, calibration: list,
                     folder: Path, widths: list[int] | None = None) -> Variant:
    pruned = copy.deepcopy(model)
    prune_(pruned, config, PruneData(example, None))
    stripped = ctk.strip(pruned, example)
    return Variant(name, count_flops(stripped, example), exported(stripped, pruned, example, calibration, folder),
                   widths)


def build(model_name: str, size: int, runtimes: list[str], precisions: list[str], value: str, folder: Path) -> dict:
    """The dense, uniform and latency-chosen models, exported; the choices and their FLOPs."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    example = (torch.randn(2, 3, size, size),)
    calibration = [(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    dense = Variant("dense", count_flops(model, example), exported(model, model, example, calibration, folder / "dense"))
    uniform = stripped_variant("uniform 50%", model, Channels(sparsity=0.5), example, calibration, folder / "uniform")
    plan = width_plan(model, example, Channels(), None, WIDTH_POINTS, MAX_SPARSITY)
    options = flops_valued(plan) if value == "flops" else plan.options
    chosen, tables = {}, {}
    for runtime in runtimes:
        for precision in precisions:
            cells = table_cells(plan.layers, plan.options)
            measured = measured_alone(runtime, precision, cells)
            table = LatencyTable(runtime, precision)
            costs = LayerCosts(plan.layers, plan.options, table)
            chooser = WidthChooser(options, costs)
            goal = predicted_flops(plan, chooser.uniform(0.5).widths)
            choice = flops_matched(chooser, plan, goal)
            key = f"{runtime}:{precision}"
            chosen[key] = stripped_variant(f"chosen in {key}", model, plan.config(choice.widths), example, calibration, folder / key.replace(":", "-"),
                                           list(choice.widths))
            tables[key] = {"path": str(table.path), "measured": measured, "cells": len(cells)}
    return {"model": model_name, "image_size": size, "value": value, "dense": dense, "uniform": uniform,
            "chosen": chosen, "tables": tables}


def timed(built: dict, runtimes: list[str], precisions: list[str], batches: list[int], rounds: int,
          iters: int) -> list[dict]:
    """Every model in every runtime and precision against dense fp32 in ORT, one run per batch size."""
    models: dict[str, tuple[str, str]] = {"dense fp32 ort": ("ort", str(built["dense"].folder / FILES["fp32"]))}
    for runtime in runtimes:
        for precision in precisions:
            key = f"{runtime}:{precision}"
            for variant in (built["dense"], built["uniform"], built["chosen"][key]):
                models[f"{variant.name} {precision} {runtime}"] = (runtime, str(variant.folder / FILES[precision]))
    size = built["image_size"]
    results = {name: {"model": name, "runtime": runtime} for name, (runtime, _) in models.items()}
    for batch in batches:
        inputs = (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)),)
        timing = compare_runtimes(models, inputs, rounds=rounds, iters=iters)
        for name, entry in timing.items():
            results[name][f"speedup_batch{batch}"] = entry["speedup"]
            results[name][f"latency_ms_batch{batch}"] = entry["ms"]
    return list(results.values())


def report(built: dict, rows: list[dict], batches: list[int]) -> Table:
    uniform = built["uniform"].flops
    out = Table(title=f"{built['model']} at {built['image_size']}px: speedup over dense fp32 in ORT "
                      f"(uniform 50%: {uniform / 1e9:.3f} GFLOPs)")
    for column in ("model", *(f"batch {b}" for b in batches)):
        out.add_column(column, justify="right" if column.startswith("batch") else "left")
    for row in rows:
        out.add_row(row["model"], *(f"{row[f'speedup_batch{b}']:.2f}x ({row[f'latency_ms_batch{b}']:.2f} ms)"
                                    for b in batches))
    return out


def flops_rows(built: dict) -> list[dict]:
    """Each chosen model's FLOPs against the uniform one's, and whether within :data:`FLOPS_MATCH`."""
    uniform = built["uniform"].flops
    return [{"choice": key, "flops": v.flops, "uniform_flops": uniform, "difference": v.flops / uniform - 1,
             "matched": abs(v.flops / uniform - 1) <= FLOPS_MATCH, "widths": v.widths, "table": built["tables"][key]}
            for key, v in built["chosen"].items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision classifier")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=8, help="rotated rounds per batch size")
    parser.add_argument("--iters", type=int, default=5, help="timed runs per block")
    parser.add_argument("--runtimes", default="ort,openvino")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--value", choices=("flops", "l1"), default="flops", help="what the knapsack keeps")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="resnet18 at 64px, 2 rounds: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.model, args.image_size, args.rounds, args.iters = "resnet18", 64, 2, 3
    runtimes, precisions = args.runtimes.split(","), args.precisions.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        built = build(args.model, args.image_size, runtimes, precisions, args.value, Path(folder))
        rows = timed(built, runtimes, precisions, batches, args.rounds, args.iters)
    console = Console()
    console.print(report(built, rows, batches))
    flops = flops_rows(built)
    for row in flops:
        console.print(f"{row['choice']}: {row['flops'] / 1e9:.3f} GFLOPs ({row['difference']:+.1%} against uniform, "
                      f"{'within' if row['matched'] else 'NOT within'} {FLOPS_MATCH:.0%}); widths {row['widths']}")
    if args.json:
        result = {"model": built["model"], "image_size": built["image_size"], "value": built["value"], "rows": rows,
                  "flops": flops}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
