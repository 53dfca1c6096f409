"""What ``ctk export`` measures of a model: parameters, FLOPs, the task's metric (in PyTorch and of
the ONNX file in ONNX Runtime), latency dense against stripped in ``--runtime``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import metrics
from .exporters import Artifact
from .models import LoadedModel
from .report import ExportReport, Latency, ModelMeasure
from .workload import OnnxRuntimeModel, Workload

LATENCY_BUDGET_S = 30.0  # the timed rounds of the latency comparison, at most (a 135 M LLM: ~0.2 s a run)
METRIC_DIGITS = 4  # significant digits of report.json's metric: ONNX Runtime equals PyTorch to these


def measure(module: nn.Module, loaded: LoadedModel, work: Workload | None, dense: nn.Module) -> ModelMeasure:
    """Parameters, FLOPs per sample and the task's metric of ``module`` (dense or stripped)."""
    return ModelMeasure(metrics.count_params(module), metrics.count_flops(module, loaded.example_inputs),
                        metric(module, work, dense))


def metric(module: nn.Module, work: Workload | None, dense: nn.Module) -> float | None:
    """The task's metric on the validation split; the embed task's is the cosine to ``dense``."""
    return work.evaluate(module, dense) if work is not None else None


def metric_summary(report: ExportReport, work: Workload, onnx: Artifact, dense: nn.Module) -> dict[str, Any]:
    """The task's metric on the validation split for the dense, pruned and stripped models and
    for the ONNX file as ONNX Runtime runs it (a static-batch file reads full batches only), to
    :data:`METRIC_DIGITS` significant digits: float rounding below them is no difference in the
    metric, so the ONNX value reads equal to the stripped model's."""
    static = onnx.static_batch
    loader = work.val_loader(static, drop_last=True) if static else work.val_loader()
    onnx_value = work.task.evaluate(OnnxRuntimeModel(onnx.path), loader, dense)[work.task.metric]
    values = {"dense": report.dense.accuracy, "pruned": (report.pruning or {}).get("accuracy"),
              "stripped": report.stripped.accuracy, "onnx": onnx_value}
    rounded = {k: None if v is None else float(f"{v:.{METRIC_DIGITS}g}") for k, v in values.items()}
    return {"name": work.task.metric, "split": "validation", **rounded}


def latency(report: ExportReport, artifacts: list[Artifact], dense_artifacts: list[Artifact], loaded: LoadedModel,
             rounds: int, runtime: str) -> Latency:
    """Dense against stripped at batch 1 in ``runtime`` (``--runtime``), alternated rounds."""
    timed = metrics.RUNTIMES[runtime]
    fmt = timed.formats["fp32"]
    dense, stripped = (next(a.path for a in written if a.format == fmt) for written in (dense_artifacts, artifacts))
    batch1 = tuple(t[:1] for t in loaded.example_inputs)
    timing = timed.compare(dense, stripped, batch1, rounds=rounds, budget_s=LATENCY_BUDGET_S)
    report.dense.latency_ms = timing["a_ms"]
    report.stripped.latency_ms = timing["b_ms"]
    return Latency(runtime, timing["ratio"], timing["rounds"])


def sparse_onnx_ratio(artifacts: list) -> dict[str, Any] | None:
    """The sparse ONNX file's size against the same graph with dense initializers (what
    unstructured zeros save on disk), when it was written."""
    sizes = {a.format: a.size_bytes for a in artifacts}
    if "onnx-sparse" not in sizes:
        return None
    dense, sparse = sizes["onnx"], sizes["onnx-sparse"]
    return {"onnx_bytes": dense, "sparse_bytes": sparse, "ratio": sparse / dense}


def environment() -> dict[str, str]:
    import onnxruntime

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
