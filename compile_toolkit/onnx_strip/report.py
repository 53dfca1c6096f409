"""The ONNX strip's report beside its output: ``OUT.report.json`` for machines (the summary as
:meth:`~.strip.OnnxStripSummary.to_dict` gives it, with the source and output paths) and
``OUT.report.md`` for people (parameters, FLOPs, file size and latency before and after, then the
coupled groups and the barriers)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..fileio import write_atomic
from ..units import byte_size, si
from .strip import OnnxStripSummary


def report_dict(summary: OnnxStripSummary, source: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """What report.json holds."""
    return {"source": str(source), "out": str(out), **summary.to_dict()}


def write_reports(summary: OnnxStripSummary, source: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``OUT.report.json`` and ``OUT.report.md`` beside the output file ``out`` (each whole or
    not at all) and return their paths."""
    out = Path(out)
    paths = out.with_name(out.name + ".report.json"), out.with_name(out.name + ".report.md")
    write_atomic(paths[0], (json.dumps(report_dict(summary, source, out), indent=2) + "\n").encode())
    write_atomic(paths[1], markdown(summary, source, out).encode())
    return paths


def markdown(summary: OnnxStripSummary, source: str | os.PathLike, out: str | os.PathLike) -> str:
    """report.md: the before/after table, then every group that lost channels or was kept, and the barriers."""
    lines = [f"# ONNX strip of `{source}`", "", f"Output: `{out}`; weights {', '.join(summary.weight_dtypes) or 'none'} "
             f"(kept). {summary.channels_removed} channels removed (each coupled channel once); max relative error "
             f"in ONNX Runtime {summary.max_relative_error:.2e} (tolerance {summary.tolerance:.1e}).", "",
             "| | before | after | change |", "|---|---:|---:|---:|"]
    if summary.verified_on == "float32 twin":
        lines[2] += (" Verified on float32 twins of the input and the output (every bfloat16 weight and cast "
                     "made float32): ONNX Runtime cannot run this bfloat16 file on the CPU, so its latency is not "
                     "measured.")
    if summary.external_data:
        lines[2] += f" Weights in `{summary.external_data}` (external data)."
    lines += [f"| {' | '.join(row)} |" for row in summary_rows(summary)]
    lines += ["", f"FLOPs: {', '.join(summary.flops_ops)} of the main graph, 2 per multiply-add, one run on "
              f"{_shapes(summary.sample_shapes)}; other ops are not counted."]
    if summary.flops_uncounted:
        lines.append(f"Not counted (shapes unknown): {', '.join(summary.flops_uncounted)}.")
    if summary.latency is not None:
        lines.append(f"Latency: ONNX Runtime CPU, {summary.latency.threads} threads, same inputs, "
                     f"{summary.latency.rounds} rounds of blocks in alternating order; the change is the median "
                     "of per-round ratios.")
    lines += ["", "## Groups", "", "| group (first carrier) | channels | kept | kept because |", "|---|---:|---:|---|"]
    for g in summary.groups:
        lines.append(f"| `{g.carriers[0]}` | {g.channels} | {g.kept} | {g.kept_because or ''} |")
    lines += ["", "## Barriers", ""] + [f"- {b}" for b in summary.barriers or ["none"]]
    return "\n".join(lines) + "\n"


def summary_rows(summary: OnnxStripSummary) -> list[tuple[str, str, str, str]]:
    """(quantity, before, after, change) rows: parameters, FLOPs, file size, and latency if measured."""
    rows = [("parameters", f"{summary.parameters_before:,}", f"{summary.parameters_after:,}",
             _fewer(summary.parameters_before, summary.parameters_after)),
            ("FLOPs", si(summary.flops_before), si(summary.flops_after),
             _fewer(summary.flops_before, summary.flops_after)),
            ("file size", byte_size(summary.file_bytes_before), byte_size(summary.file_bytes_after),
             _fewer(summary.file_bytes_before, summary.file_bytes_after, "smaller"))]
    latency = summary.latency
    if latency is not None:
        rows.append(("ORT latency", f"{latency.before_ms:.3f} ms", f"{latency.after_ms:.3f} ms",
                     f"{latency.speedup:.2f}x faster"))
    return rows


def _shapes(shapes: dict[str, list[int]]) -> str:
    return ", ".join(f"`{name}` {'x'.join(map(str, shape)) or 'scalar'}" for name, shape in shapes.items())


def _fewer(before: float, after: float, word: str = "fewer") -> str:
    return f"{before / after:.2f}x {word}" if after else ""
