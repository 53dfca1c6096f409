"""``quantize()``: one verb from a float ONNX file to a verified int8 one.

Post-training quantization loses accuracy unevenly: a few layers (often the first convolution,
the classifier, or a layer whose activations have outliers) account for most of the loss. So the
result is judged by the task's metric, and when the drop is over the limit the layers whose
int8 error costs most are kept in float (mixed precision by layer) until it is within it.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..errors import CtkError
from ..onnx_runtime import session
from .calibration import check_batches, feeds
from .config import OrtAuto, OrtInt8, OrtStatic
from .evaluate import Metric, fidelity_metric
from .onnx_int8 import (
    NodeCount,
    activation_matmuls,
    compute_nodes,
    has_conv,
    layer_names,
    learned_tensor_ranges,
    override_ranges,
    preprocess,
    quantize_onnx,
)

SENSITIVITY_SHOWN = 10  # layers listed in the report, most sensitive first


@dataclass
class QuantResult:
    """What :func:`quantize` made and how it scored.

    ``metric_drop`` is float score minus int8 score, in the metric's points. ``kept_float`` are
    the Conv/Gemm/MatMul nodes left in float (asked for, chosen by sensitivity, or, in dynamic
    int8, ``activation_matmuls``: MatMuls of two activations, which it cannot quantize);
    ``kept_float_layers`` names the module each kept node came from, where the exporter said;
    ``sensitivity`` maps the most sensitive nodes to the fidelity (100 x output cosine to
    float, on the calibration batches) gained by keeping that node alone in float.
    ``learned_inputs`` maps each tensor whose range came from quantization-aware training
    (``config.activation_ranges``) to that range; every other quantized tensor was calibrated.
    """

    path: str
    method: str
    calibration_method: str | None
    metric: str
    float_score: float
    int8_score: float
    metric_drop: float
    max_metric_drop: float | None
    compute_nodes: int
    quantized_nodes: list[str]
    kept_float: list[str]
    activation_matmuls: list[str]
    qdq_nodes: int
    integer_nodes: int
    kept_float_layers: dict[str, str] = field(default_factory=dict)
    sensitivity: dict[str, float] = field(default_factory=dict)
    learned_inputs: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def quantize(float_onnx: str, out_path: str, calibration: Iterable[Sequence[torch.Tensor] | torch.Tensor] | None,
             config: OrtInt8 | None = None, metric: Metric | None = None) -> QuantResult:
    """Quantize ``float_onnx`` to int8 into ``out_path`` and judge it by ``metric``.

    ``calibration``: input batches (tuples of tensors, or tensors for one-input models) that
    fit the model; static quantization calibrates on them, and they are the data of the default
    metric (output cosine to float), so dynamic quantization wants them too. ``metric`` scores
    an ONNX file in points (e.g. :func:`~compile_toolkit.quantize.evaluate.accuracy_metric`).
    Raises CtkError when the quantizer left a node in float unasked, quantized nothing, or the
    metric falls by more than ``config.max_metric_drop`` even with the allowed share of layers
    kept in float; ``out_path`` is then not written.
    """
    config = _checked(config)
    batches = check_batches(calibration, float_onnx)
    with tempfile.TemporaryDirectory(prefix="ctk-int8-") as work:
        pre = os.path.join(work, "pre.onnx")
        preprocess(float_onnx, pre)
        if isinstance(config, OrtAuto):
            config = config.resolve(has_conv(pre))
        method = config.METHOD
        unquantizable = activation_matmuls(pre) if method == "dynamic" else []
        calibration_feeds = feeds([i.name for i in session(pre).get_inputs()], batches)
        cache = os.path.join(work, "calibration.json")

        def attempt(exclude: Sequence[str], tag: str) -> tuple[str, NodeCount]:
            path = os.path.join(work, f"{tag}.onnx")
            return path, quantize_onnx(pre, path, config, calibration_feeds, exclude, cache)

        fidelity = fidelity_metric(pre, batches)
        metric = metric or fidelity
        float_score = metric.score(pre)
        exclude = list(dict.fromkeys(config.nodes_to_exclude))
        learned = learned_tensor_ranges(pre, config.activation_ranges) if isinstance(config, OrtStatic) else {}
        path, count = attempt(exclude, "int8")
        if learned:  # the calibration cache now exists: learned ranges replace calibrated ones
            override_ranges(cache, learned)
            path, count = attempt(exclude, "qat")
        score = metric.score(path)
        ranked: dict[str, float] = {}
        if _over(float_score - score, config) and config.mixed_precision:
            ranked = _sensitivity(attempt, list(count.quantized), exclude, fidelity, fidelity.score(path))
            budget = math.floor(config.max_float_fraction * len(compute_nodes(pre))) - len(exclude)
            for extra in list(ranked)[:max(budget, 0)]:
                exclude.append(extra)
                path, count = attempt(exclude, f"mixed-{len(exclude)}")
                score = metric.score(path)
                if not _over(float_score - score, config):
                    break
        drop = float_score - score
        if _over(drop, config):
            kept = f" with {len(exclude)} layers kept in float" if exclude else ""
            raise CtkError(f"int8 ({method}) {metric.name} drops {drop:.2f} points ({float_score:.2f} -> {score:.2f})"
                           f"{kept}, more than --max-metric-drop {config.max_metric_drop:g}")
        kept_layers = layer_names(float_onnx, count.float_nodes)
        shutil.copyfile(path, out_path)
    return QuantResult(
        path=out_path, method=method,
        calibration_method=config.calibration_method if isinstance(config, OrtStatic) else None,
        metric=metric.name, float_score=float_score, int8_score=score, metric_drop=drop,
        max_metric_drop=config.max_metric_drop, compute_nodes=len(count.quantized) + len(count.float_nodes),
        quantized_nodes=count.quantized, kept_float=count.float_nodes,
        activation_matmuls=unquantizable, qdq_nodes=count.qdq,
        integer_nodes=count.integer, kept_float_layers=kept_layers,
        sensitivity=dict(list(ranked.items())[:SENSITIVITY_SHOWN]), learned_inputs=learned)


def _checked(config: OrtInt8 | None) -> OrtInt8:
    """``config`` validated (default :class:`OrtAuto`); CtkError for a config ONNX Runtime does not carry out."""
    if config is None:
        return OrtAuto()
    if not isinstance(config, OrtInt8):
        raise CtkError(f"quantize() makes an int8 ONNX file with ONNX Runtime: config must be OrtStatic, OrtDynamic "
                       f"or OrtAuto, got {type(config).__name__}")
    return config.validate()


def _over(drop: float, config: OrtInt8) -> bool:
    return config.max_metric_drop is not None and drop > config.max_metric_drop


def _sensitivity(attempt, candidates: list[str], exclude: list[str], fidelity: Metric,
                 all_int8: float) -> dict[str, float]:
    """Fidelity gained by keeping each candidate alone in float (beside ``exclude``), largest
    first. Measured on the calibration batches, not on the evaluation data, so that choosing
    the layers does not fit the evaluation split."""
    gains = {}
    for index, name in enumerate(candidates):
        path, _ = attempt([*exclude, name], f"probe-{index}")
        gains[name] = fidelity.score(path) - all_int8
    return dict(sorted(gains.items(), key=lambda item: -item[1]))
