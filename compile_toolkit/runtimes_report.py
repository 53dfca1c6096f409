"""The report's ``runtimes`` section: every model a job wrote, in every runtime that runs it, timed
together against the dense fp32 model in ONNX Runtime.

Where a pruned model is deployed decides how much faster it is: the same stripped int8 file runs
at a different speed in ONNX Runtime and in OpenVINO, and int8 kernels favour some widths. So
with ``--formats openvino`` the job times dense and stripped, fp32 and int8 (with ``--quantize``),
in ONNX Runtime (``.onnx``) and OpenVINO (``openvino/*.xml``), at batch 1 and 8, all in one set
of alternated rounds (:func:`~compile_toolkit.metrics.compare_runtimes`), so every speedup is a
median of per-round ratios to the same baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .capture import Inputs
from .exporters import Artifact
from .metrics import RUNTIMES, compare_runtimes

BASELINE = "dense fp32 ort"
BATCHES = (1, 8)


def section(artifacts: list[Artifact], dense_artifacts: list[Artifact], staging: Path, example_inputs: Inputs,
            static_batch: int | None, rounds: int, budget_s: float) -> dict[str, Any]:
    """``{"baseline", "batches", "models": {"<dense|stripped> <fp32|int8> <ort|openvino>": {"model",
    "precision", "runtime", "file", "latency_ms_batch<B>", "speedup_batch<B>"}}}`` for the artifacts
    (in ``staging``) that a runtime of :data:`~compile_toolkit.metrics.RUNTIMES` runs; a model fixed
    to ``static_batch`` is timed at that batch only. ``budget_s`` bounds the rounds of each batch."""
    models: dict[str, tuple[str, str]] = {}
    entries: dict[str, dict[str, Any]] = {}
    for model, written in (("dense", dense_artifacts), ("stripped", artifacts)):
        paths = {a.format: Path(a.path) for a in written}
        for runtime in RUNTIMES.values():
            for precision, fmt in runtime.formats.items():
                if fmt in paths:
                    name = f"{model} {precision} {runtime.name}"
                    models[name] = (runtime.name, str(paths[fmt]))
                    entries[name] = {"model": model, "precision": precision, "runtime": runtime.name,
                                     "file": str(paths[fmt].relative_to(staging))}
    batches = (static_batch,) if static_batch else BATCHES
    for batch in batches:
        timing = compare_runtimes(models, _at_batch(example_inputs, batch), rounds=rounds, budget_s=budget_s)
        for name, measured in timing.items():
            entries[name][f"latency_ms_batch{batch}"] = measured["ms"]
            entries[name][f"speedup_batch{batch}"] = measured["speedup"]
    return {"baseline": f"{BASELINE} (speedup: its latency over each model's, median of alternated rounds)",
            "batches": list(batches), "models": entries}


def markdown_lines(section: dict[str, Any] | None) -> list[str]:
    """The table of :func:`section` for report.md."""
    if not section:
        return []
    batches = section["batches"]
    lines = ["", "## Runtimes", "", f"Against {section['baseline']}.", "",
             "| model | precision | runtime | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|---|---|" + "---:|" * len(batches)]
    for entry in section["models"].values():
        cells = [f"{entry[f'latency_ms_batch{b}']:.3f} ms ({entry[f'speedup_batch{b}']:.2f}x)" for b in batches]
        lines.append(f"| {entry['model']} | {entry['precision']} | {entry['runtime']} | {' | '.join(cells)} |")
    return lines


def _at_batch(inputs: Inputs, batch: int) -> Inputs:
    """The example inputs with ``batch`` rows (their rows repeated as needed)."""
    return tuple(torch.cat([t] * -(-batch // len(t)))[:batch] for t in inputs)
