"""Reports of the export job: ``report.json`` for machines, ``report.md`` and a table for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table


def write_reports(report: dict[str, Any], folder: Path) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report))


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, dense, stripped, change) rows shared by the console table and the Markdown."""
    dense, stripped = report["dense"], report["stripped"]
    rows = [
        ("parameters", f"{dense['params']:,}", f"{stripped['params']:,}", _ratio(dense["params"], stripped["params"])),
        ("FLOPs / sample", _si(dense["flops"]), _si(stripped["flops"]), _ratio(dense["flops"], stripped["flops"])),
    ]
    dense_sizes = {a["format"]: a["size_bytes"] for a in dense.get("artifacts", [])}
    for artifact in report.get("artifacts", []):
        fmt = artifact["format"]
        before = dense_sizes.get("onnx" if fmt == "onnx-sparse" else fmt)  # the dense ONNX file, as stored
        rows.append(
            (
                f"{fmt} size",
                _bytes(before) if before else "-",
                _bytes(artifact["size_bytes"]),
                _ratio(before, artifact["size_bytes"]) if before else "",
            )
        )
    if "latency_ms" in dense:
        rows.append(
            ("ORT latency, batch 1", f"{dense['latency_ms']:.3f} ms", f"{stripped['latency_ms']:.3f} ms", f"{report['speedup']:.2f}x faster")
        )
    if dense.get("accuracy") is not None:
        pruned = report.get("pruning", {}).get("accuracy")
        middle = f" (pruned {pruned:.2%})" if pruned is not None else ""
        rows.append(("test accuracy", f"{dense['accuracy']:.2%}", f"{stripped['accuracy']:.2%}{middle}", f"{stripped['accuracy'] - dense['accuracy']:+.2%}"))
    return rows


def console_tables(report: dict[str, Any]) -> list[Table]:
    summary = Table(title=f"{report['model']}: dense vs stripped (sparsity {report['sparsity']:.0%})")
    for column in ("", "dense", "stripped", "change"):
        summary.add_column(column, justify="left" if not column else "right")
    for row in summary_rows(report):
        summary.add_row(*row)
    artifacts = Table(title="artifacts, verified in their runtimes against the pruned model")
    for column in ("format", "path", "size", "max abs error", "runtime"):
        artifacts.add_column(column)
    for a in report["artifacts"]:
        artifacts.add_row(a["format"], a["path"], _bytes(a["size_bytes"]), f"{a['max_abs_error']:.2e}", a["runtime"])
    return [summary, artifacts]


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# {report['model']}: export report", "", f"Structured sparsity: {report['sparsity']:.0%}", ""]
    if report.get("notes"):
        lines += [f"Note: {note}" for note in report["notes"]] + [""]
    lines += ["| | dense | stripped | change |", "|---|---:|---:|---:|"]
    lines += [f"| {' | '.join(row)} |" for row in summary_rows(report)]
    lines += ["", "## Artifacts", "", "| format | path | size | max abs error | runtime |", "|---|---|---:|---:|---|"]
    for a in report["artifacts"]:
        lines.append(f"| {a['format']} | `{a['path']}` | {_bytes(a['size_bytes'])} | {a['max_abs_error']:.2e} | {a['runtime']} |")
    strip = report["strip"]
    lines += ["", "## Strip", "", f"Channels removed: {strip['channels_removed']}; max relative error {strip['max_relative_error']:.2e}.", ""]
    lines += ["| group (first carrier) | channels | kept | kept because |", "|---|---:|---:|---|"]
    for g in strip["groups"]:
        lines.append(f"| `{g['carriers'][0]}` | {g['channels']} | {g['kept']} | {g['kept_because'] or ''} |")
    lines += ["", "## Seconds per step", ""]
    lines += [f"- {name}: {seconds:.2f}" for name, seconds in report.get("seconds", {}).items()]
    return "\n".join(lines) + "\n"


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}x smaller" if after else ""


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def _bytes(value: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("kB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"
