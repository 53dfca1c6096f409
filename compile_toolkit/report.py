"""Reports of the export job: ``report.json`` for machines, ``report.md`` and a table for people."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from . import runtimes_report
from .metrics import RUNTIMES
from .strip import RTOL
from .units import byte_size, si


@dataclass
class ModelMeasure:
    """One model's cost and quality: parameters, FLOPs per sample, the task's metric on the
    validation split (None without data), batch-1 latency and the files written of it."""

    params: int
    flops: int
    accuracy: float | None
    latency_ms: float | None = None
    artifacts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Latency:
    """Dense against stripped at batch 1 in ``runtime``: the median of per-round ratios."""

    runtime: str
    speedup: float
    rounds: int


@dataclass
class ExportReport:
    """What ``ctk export`` did, filled stage by stage (load, prune, strip, export, measure); report.json
    (:meth:`to_dict`), report.md and the console tables are views of it. ``pruning``, ``metric`` and
    ``quantization`` are the sections their stages return."""

    model: str
    sparsity: float
    notes: list[str]
    dense: ModelMeasure
    stripped: ModelMeasure | None = None
    strip: dict[str, Any] | None = None
    pruning: dict[str, Any] | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    latency: Latency | None = None
    metric: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    runtimes: dict[str, Any] | None = None
    sparse_onnx: dict[str, Any] | None = None
    pipeline: dict[str, Any] | None = None
    environment: dict[str, str] = field(default_factory=dict)
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report.json layout: a section a stage did not fill is left out."""
        found = {name: value for name, value in asdict(self).items() if value not in (None, {}) and name != "latency"}
        if self.latency is not None:
            found.update(latency_runtime=self.latency.runtime, speedup=self.latency.speedup,
                         latency_rounds=self.latency.rounds)
        return found

    def write(self, folder: Path) -> None:
        """report.json and report.md into ``folder``."""
        report = self.to_dict()
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (folder / "report.md").write_text(markdown(report))


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, dense, stripped, change) rows shared by the console table and the Markdown."""
    dense, stripped = report["dense"], report["stripped"]
    rows = [
        ("parameters", f"{dense['params']:,}", f"{stripped['params']:,}", _ratio(dense["params"], stripped["params"])),
        ("FLOPs / sample", si(dense["flops"]), si(stripped["flops"]), _ratio(dense["flops"], stripped["flops"])),
    ]
    dense_sizes = {a["format"]: a["size_bytes"] for a in dense.get("artifacts", [])}
    for artifact in report.get("artifacts", []):
        fmt = artifact["format"]
        before = dense_sizes.get("onnx" if fmt == "onnx-sparse" else fmt)  # the dense ONNX file, as stored
        rows.append(
            (
                f"{fmt} size",
                byte_size(before) if before else "-",
                byte_size(artifact["size_bytes"]),
                _ratio(before, artifact["size_bytes"]) if before else "",
            )
        )
    if "latency_ms" in dense:
        runtime = RUNTIMES[report.get("latency_runtime", "ort")].title  # ctk export --runtime
        rows.append(
            (f"{runtime} latency, batch 1", f"{dense['latency_ms']:.3f} ms", f"{stripped['latency_ms']:.3f} ms", f"{report['speedup']:.2f}x faster")
        )
    if dense.get("accuracy") is not None:
        label, form = METRIC_ROWS[report.get("metric", {}).get("name", "top1")]
        pruned = report.get("pruning", {}).get("accuracy")
        middle = f" (pruned {pruned:{form}})" if pruned is not None else ""
        rows.append((label, f"{dense['accuracy']:{form}}", f"{stripped['accuracy']:{form}}{middle}",
                     f"{stripped['accuracy'] - dense['accuracy']:+{form}}"))
    return rows


# the task metric's row: label and format (report.json's metric.name; digits and image folders: top1)
METRIC_ROWS = {"top1": ("test accuracy", ".2%"), "perplexity": ("perplexity (validation)", ".2f"),
               "cosine": ("cosine to dense (validation)", ".4f")}


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
        artifacts.add_row(a["format"], a["path"], byte_size(a["size_bytes"]), f"{a['max_abs_error']:.2e}", a["runtime"])
    return [summary, artifacts]


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# {report['model']}: export report", "", f"Structured sparsity: {report['sparsity']:.0%}", ""]
    if report.get("notes"):
        lines += [f"Note: {note}" for note in report["notes"]] + [""]
    lines += ["| | dense | stripped | change |", "|---|---:|---:|---:|"]
    lines += [f"| {' | '.join(row)} |" for row in summary_rows(report)]
    lines += _target_lines((report.get("pruning") or {}).get("target"))
    lines += ["", "## Artifacts", "", "| format | path | size | max abs error | runtime |", "|---|---|---:|---:|---|"]
    for a in report["artifacts"]:
        lines.append(f"| {a['format']} | `{a['path']}` | {byte_size(a['size_bytes'])} | {a['max_abs_error']:.2e} | {a['runtime']} |")
    lines += _quantization_lines(report.get("quantization"))
    lines += runtimes_report.markdown_lines(report.get("runtimes"))
    strip = report["strip"]
    held = f" (allowed {strip['tolerance']:.2g}: the model's own float32 rounding)" if strip.get("tolerance", 0) > RTOL else ""
    lines += ["", "## Strip", "", f"Channels removed: {strip['channels_removed']}; max relative error "
              f"{strip['max_relative_error']:.2e}{held}.", ""]
    lines += ["| group (first carrier) | channels | kept | kept because |", "|---|---:|---:|---|"]
    for g in strip["groups"]:
        lines.append(f"| `{g['carriers'][0]}` | {g['channels']} | {g['kept']} | {g['kept_because'] or ''} |")
    pipeline = report["pipeline"]
    lines += ["", "## Pipeline", "", f"{pipeline['captures']} captures with torch.export "
              f"({'; '.join(pipeline['capture_reasons'])}), {pipeline['captures_reused']} reused; "
              f"{len(pipeline['programs_lifted'])} programs lifted from rewritten graphs without a capture "
              f"({'; '.join(pipeline['programs_lifted']) or 'none'}); "
              f"{pipeline['analyses']} channel analyses ({'; '.join(pipeline['analysis_reasons']) or 'none'}).", "", "Seconds per stage:", ""]
    lines += [f"- {stage['name']}: {stage['seconds']:.2f}" for stage in pipeline["stages"]]
    return "\n".join(lines) + "\n"


def _target_lines(target: dict[str, Any] | None) -> list[str]:
    """``--target-speedup`` / ``--target-latency-ms``: what was asked, how it was chosen, what the
    final export measured."""
    if not target or "met" not in target:
        return []
    runtime = RUNTIMES[target["runtime"]].title
    how = "each group's width chosen over the per-layer latency table"
    if "target_latency_ms" in target:
        asked = f"{target['target_latency_ms']:g} ms at batch 1 (a {target['target']:.2f}x speedup)"
        got = f"{target['latency_ms']:.3f} ms ({target['speedup']:.2f}x)"
    else:
        asked, got = f"{target['target']:g}x at batch 1", f"{target['speedup']:.2f}x"
    return ["", f"Target: {asked} in {runtime}; {how}; measured after export: {got}, "
                f"{'met' if target['met'] else 'NOT met'}."]


def _quantization_lines(section: dict[str, Any] | None) -> list[str]:
    """The int8 table of ``--quantize``: accuracy, size, latency and deviation per model."""
    if not section:
        return []
    onnx = section["onnx"]
    layers = onnx.get("kept_float_layers", {})
    kept = ", ".join(f"`{n}`" + (f" ({layers[n]})" if n in layers else "") for n in onnx["kept_float"]) or "none"
    metric = section.get("metric", {"name": "top1", "key": "accuracy"})
    label, form = METRIC_ROWS.get(metric["name"], (metric["name"], ".4g"))
    key = metric["key"]
    lines = ["", "## int8", "",
             f"ONNX: {onnx['method']} int8 ({onnx['calibration_method'] or 'no calibration'}), "
             f"{len(onnx['quantized_nodes'])} of {onnx['compute_nodes']} Conv/Gemm/MatMul nodes quantized, "
             f"{onnx['qdq_nodes']} Q/DQ nodes; kept in float: {kept}. {onnx['metric']} drop "
             f"{onnx['metric_drop']:.2f} points (limit {onnx['max_metric_drop']}).{_learned(onnx)} "
             "Speedups against float stripped.",
             "", f"| model | {label} | size | latency b1 | speedup b1 | latency b8 | speedup b8 | max / mean abs dev |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in section["models"].items():
        lines.append(f"| {name} | {m[key]:{form}} | {byte_size(m['size_bytes'])} | {m['latency_ms_batch1']:.3f} ms | "
                     f"{m['speedup_batch1']:.2f}x | {m['latency_ms_batch8']:.3f} ms | {m['speedup_batch8']:.2f}x | "
                     f"{m['max_abs_deviation']:.3g} / {m['mean_abs_deviation']:.3g} |")
    pt2 = section["pt2"]
    lines += ["", f"pt2: {pt2}" if isinstance(pt2, str) else
              f"pt2 (PT2E, {pt2['quantizer']}): {pt2['quantized_layers']} of {pt2['layers']} conv2d/linear "
              f"nodes quantized, {pt2['quantize_nodes']} quantize nodes."]
    return lines


def _learned(onnx: dict[str, Any]) -> str:
    learned = onnx.get("learned_inputs")
    return (f" Input ranges of {len(learned)} tensors from quantization-aware training (the other tensors "
            "calibrated)." if learned else "")


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}x smaller" if after else ""
