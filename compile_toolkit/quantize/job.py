"""``ctk export --pruned --quantize int8``: the calibration data of the job's model, and the
``quantization`` section of its report (float stripped against int8 stripped and int8 dense)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ..capture import Inputs
from ..errors import CtkError
from ..exporters.artifact import Artifact
from ..metrics import compare_latency_many
from ..models import LoadedModel
from ..tasks import Classify
from ..workload import OnnxRuntimeModel, Workload, positional
from .config import QuantizeConfig, ort_config
from .evaluate import accuracy_metric, deviation

# The key of each model's score in the report: the task's metric, top-1 as "accuracy" (a fraction).
METRIC_KEYS = {"top1": "accuracy"}
CALIBRATION_IMAGES = 256  # of the training split: ranges settle well before this on digits
CALIBRATION_BATCH = 8


def calibration_batches(loaded: LoadedModel, work: Workload | None = None) -> list[Inputs]:
    """The model inputs of the first :data:`CALIBRATION_IMAGES` training samples of the workload
    (``--data``, or the model's default data), in batches; CtkError for a model without data."""
    if work is None:
        raise CtkError(f"--quantize int8 needs calibration data: --model {loaded.name!r} has no built-in data "
                       "set (digits-resnet has); give --data, or use the Python API, ctk.export(..., "
                       "quantize='int8', calibration=batches)")
    columns = [torch.cat(c)[:CALIBRATION_IMAGES] for c in zip(*work.calibration_inputs(CALIBRATION_IMAGES), strict=True)]
    return list(zip(*(c.split(CALIBRATION_BATCH) for c in columns), strict=True))


def labelled_images(work: Workload | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The validation images and labels of a classification workload held as two tensors (the
    built-in digits; a ``file.py:factory`` returning ``TensorDataset``\\ s): int8 is judged by
    top-1 accuracy on them in ONNX Runtime, in large batches. None for any other workload."""
    val = work.splits.val if work is not None else None
    if isinstance(val, TensorDataset) and len(val.tensors) == 2 and isinstance(work.task, Classify):
        return val.tensors[0], val.tensors[1]
    return None


def export_options(loaded: LoadedModel, configs: tuple[QuantizeConfig, ...],
                   work: Workload | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``export()`` keywords for the stripped model (held to the limit) and the dense one
    (ONNX only, measured for comparison: its drop does not fail the job). Judged by test accuracy
    on labelled images held in memory (the digits), else by output cosine to float on the calibration batches."""
    batches = calibration_batches(loaded, work)
    labelled = labelled_images(work)
    metric = accuracy_metric(*labelled) if labelled is not None else None
    stripped = {"quantize": configs, "calibration": batches, "metric": metric}
    dense = {"quantize": ort_config(configs).measured_only(), "calibration": batches, "metric": metric}
    return stripped, dense


def section(artifacts: list[Artifact], dense_artifacts: list[Artifact], staging: Path, loaded: LoadedModel,
            rounds: int, work: Workload | None = None) -> dict[str, Any]:
    """Accuracy on the test split (with ``--data``: the task's metric on its validation split),
    size, ONNX Runtime latency at batch 1 and 8 (alternated, median of ratios to the float
    stripped model) and output deviation from the float model, for float dense / float stripped /
    int8 stripped / int8 dense; plus what the quantizers did."""
    by_format = {a.format: a for a in artifacts}
    dense_by_format = {a.format: a for a in dense_artifacts}
    paths = {"float_stripped": by_format["onnx"].path, "int8_stripped": by_format["onnx-int8"].path,
             "int8_dense": dense_by_format["onnx-int8"].path, "float_dense": dense_by_format["onnx"].path}
    floats = {"float_stripped": paths["float_stripped"], "int8_stripped": paths["float_stripped"],
              "int8_dense": paths["float_dense"], "float_dense": paths["float_dense"]}
    labelled = labelled_images(work)
    if labelled is not None:
        x, y = labelled
        test, first = [(x[i:i + 512],) for i in range(0, len(x), 512)], (x,)
        accuracy = accuracy_metric(x, y)
        scores = {name: accuracy.score(path) / 100 for name, path in paths.items()}
        metric = {"name": "top1", "split": "validation"}
    else:  # the --data workload; embeddings are compared with the float model's (the dense of each)
        test = [positional(batch) for batch in work.val_loader()]
        first = test[0]
        scores = {name: work.task.evaluate(OnnxRuntimeModel(path), work.val_loader(),
                                           OnnxRuntimeModel(floats[name]))[work.task.metric]
                  for name, path in paths.items()}
        metric = {"name": work.task.metric, "split": "validation"}
    key = METRIC_KEYS.get(metric["name"], metric["name"])
    models: dict[str, dict[str, Any]] = {
        name: {"file": os.path.relpath(path, staging), "size_bytes": os.path.getsize(path),
               key: scores[name], **deviation(floats[name], path, test)}
        for name, path in paths.items()}
    for batch in (1, 8):
        timing = compare_latency_many(paths, tuple(t[:batch] for t in first), rounds=rounds)
        for name, entry in timing.items():
            models[name][f"latency_ms_batch{batch}"] = entry["ms"]
            models[name][f"speedup_batch{batch}"] = entry["speedup"]
    details = by_format["onnx-int8"].details or {}
    return {
        "baseline": "float_stripped (speedups are its latency over each model's, median of alternated rounds)",
        "metric": {**metric, "key": key},
        "models": models,
        **_change(key, models["float_stripped"][key], models["int8_stripped"][key]),
        "onnx": {k: v for k, v in details.items() if k != "path"},
        "dense_onnx": {k: v for k, v in (dense_by_format["onnx-int8"].details or {}).items() if k != "path"},
        "pt2": (by_format["pt2-int8"].details if "pt2-int8" in by_format
                else details.get("pt2_int8", "not requested (pt2 not in --formats)")),
    }


def _change(key: str, float_score: float, int8_score: float) -> dict[str, float]:
    """Accuracy's drop in points; another metric's change int8 minus float, in its own units
    (perplexity up is worse, cosine down is worse)."""
    if key == "accuracy":
        return {"accuracy_drop_points": 100 * (float_score - int8_score)}
    return {f"{key}_change": int8_score - float_score}
