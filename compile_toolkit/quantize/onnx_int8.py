"""int8 ONNX through ONNX Runtime's own quantizer, and a count of what it really quantized.

The steps are ONNX Runtime's: ``quant_pre_process`` (symbolic shape inference and graph
optimisation, so the quantizer sees fused, fully shaped nodes), then ``quantize_static`` (QDQ:
QuantizeLinear/DequantizeLinear around each Conv, Gemm and MatMul, weights per output channel,
activation ranges from calibration) or ``quantize_dynamic`` (ConvInteger/MatMulInteger with
activations quantized per batch). Calibration runs once per model: its ranges are cached so the
mixed-precision search can re-quantize with other layers kept in float without re-calibrating.

Keeping a node in float means more than ONNX Runtime's ``nodes_to_exclude`` does: that leaves
the node's weights and arithmetic in float, but its input still passes through the
QuantizeLinear/DequantizeLinear pair that the *producer* put on its own output, so a layer
excluded because its input has outliers still reads the rounded input and gains nothing.
:func:`float_inputs` therefore rewires each excluded node to read the float tensors
behind those pairs, up to the nearest Conv/Gemm/MatMul outputs (which then also stay float on
that path).

A quantizer that skips a node says nothing, so :func:`count_int8` checks the result node by node:
every Conv/Gemm/MatMul of the float graph is either quantized or on the list of nodes kept in
float, and :func:`quantize_onnx` raises when one is neither or when nothing was quantized at all.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.calibrate import TensorData, load_tensors_data, save_tensors_data
from onnxruntime.quantization.shape_inference import quant_pre_process

from ..errors import CtkError, summary
from .calibration import Reader
from .config import OrtDynamic, OrtStatic

COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
# What static int8 puts Q/DQ around: the compute ops, Gather (an embedding table is a weight:
# int8 makes all-MiniLM-L6-v2's file 2.7x smaller), and the ops that only move, select or clip
# values (exact in int8 given an int8 input), so integer kernels chain through them. Not, although
# ONNX Runtime's default would: LayerNormalization, whose input is a transformer's residual stream
# (a few outlier channels take the whole per-tensor range: MiniLM's static int8 embeddings had
# cosine 0.35 to float with it, 0.94 without), nor the other normalizations, Where (an attention
# mask's -3.4e38), CumSum and TopK, which compute values of their own.
STATIC_OPS = (*COMPUTE_OPS, "ConvTranspose", "Gather", "Relu", "Clip", "MaxPool", "AveragePool", "Pad", "Resize",
              "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split")
INTEGER_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul")
CALIBRATORS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
ACTIVATIONS = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
_INTEGER_NAME = re.compile(r"^(?P<node>.*?)(?:_MatMul)?_quant$")  # quantize_dynamic's node names


@dataclass(frozen=True)
class NodeCount:
    """What an int8 graph holds: ``quantized`` and ``float_nodes`` are names of the float graph's
    Conv/Gemm/MatMul nodes; ``qdq`` counts QuantizeLinear + DequantizeLinear (+ DynamicQuantizeLinear)
    nodes, ``integer`` the integer-kernel nodes."""

    quantized: list[str] = field(default_factory=list)
    float_nodes: list[str] = field(default_factory=list)
    qdq: int = 0
    integer: int = 0


def preprocess(float_path: str, out_path: str) -> None:
    """ONNX Runtime's pre-processing (shape inference, graph optimisation) into ``out_path``.

    Its symbolic shape inference gives up on a sequence length that is dynamic (the capture
    makes token inputs' dim 1 dynamic: MiniLM fails on ``Min(512, s53)``, the position-embedding
    slice) and then saves the half-inferred model with all its weights, as
    ``sym_shape_infer_temp.onnx`` plus data files, into the current folder (245 MB for MiniLM).
    So it runs in a scratch folder, and on that failure again with ONNX's own shape inference
    only (``skip_symbolic_shape``)."""
    float_path, out_path = os.path.abspath(float_path), os.path.abspath(out_path)
    with tempfile.TemporaryDirectory(prefix="ctk-preprocess-") as scratch, contextlib.chdir(scratch):
        try:
            try:
                quant_pre_process(float_path, out_path)
            except Exception as error:
                if "Incomplete symbolic shape inference" not in str(error):
                    raise
                quant_pre_process(float_path, out_path, skip_symbolic_shape=True)
        except Exception as error:
            raise CtkError(f"onnx int8: ONNX Runtime's quantization pre-processing failed on {float_path}: "
                           f"{summary(error)}") from error


def compute_nodes(path: str) -> list[str]:
    """Names of the Conv, Gemm and MatMul nodes: the layers int8 is for."""
    return [n.name for n in onnx.load(path, load_external_data=False).graph.node if n.op_type in COMPUTE_OPS]


def layer_names(path: str, nodes: Sequence[str]) -> dict[str, str]:
    """The module each of ``nodes`` was exported from (``bert.encoder.layer.0.output.dense``; a
    conv with its batch norm folded in carries the norm's, ``res.conv2.1``), by node name, where
    torch's ONNX exporter recorded it (``pkg.torch.onnx.name_scopes`` metadata, whose last entry is
    the op itself): ``node_MatMul_139`` says nothing to a reader. Read from the exported file, since
    ONNX Runtime's pre-processing drops node metadata (it keeps the names)."""
    names = {}
    for node in onnx.load(path, load_external_data=False).graph.node:
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes")
        if node.name in set(nodes) and scopes:
            scope = ast.literal_eval(scopes)
            if len(scope) >= 2 and scope[-2]:
                names[node.name] = scope[-2]
    return names


def activation_matmuls(path: str) -> list[str]:
    """MatMul nodes with no constant operand (attention's Q x K^T and P x V): ``quantize_dynamic``
    quantizes weights ahead of time, so it has nothing to quantize there and leaves them float."""
    graph = onnx.load(path, load_external_data=False).graph
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not constants & set(n.input)]


def has_conv(path: str) -> bool:
    return any(n.op_type == "Conv" for n in onnx.load(path, load_external_data=False).graph.node)


def learned_tensor_ranges(pre_path: str, ranges: Sequence[tuple[str, float, float]]) -> dict[str, tuple[float, float]]:
    """The learned input range of each layer (quantization-aware training) on the tensor its
    Conv/Gemm/MatMul node reads: the node whose weight initializer is ``<layer>.weight`` (torch's
    exporter names initializers after the parameters, batch norm folded or not, and ONNX
    Runtime's pre-processing keeps them). Layers that read the same tensor get the union.
    CtkError when no layer matches a node (a checkpoint of another model)."""
    by_weight = {f"{layer}.weight": (low, high) for layer, low, high in ranges}
    found: dict[str, tuple[float, float]] = {}
    for node in onnx.load(pre_path, load_external_data=False).graph.node:
        if node.op_type in COMPUTE_OPS and len(node.input) >= 2 and node.input[1] in by_weight:
            low, high = by_weight[node.input[1]]
            old_low, old_high = found.get(node.input[0], (low, high))
            found[node.input[0]] = (min(low, old_low), max(high, old_high))
    if ranges and not found:
        names = ", ".join(layer for layer, _, _ in ranges[:4])
        raise CtkError(f"learned activation ranges: none of the {len(ranges)} layers ({names}, ...) is a "
                       "Conv/Gemm/MatMul of the graph (no weight initializer named <layer>.weight)")
    return found


def override_ranges(cache_path: str, ranges: dict[str, tuple[float, float]]) -> None:
    """Replace the calibrated ranges of ``ranges``' tensors in ONNX Runtime's calibration cache,
    which every later ``quantize_static`` with that cache then uses."""
    data = load_tensors_data(cache_path)
    missing = sorted(set(ranges) - set(data.keys()))
    if missing:
        raise CtkError(f"learned activation ranges: ONNX Runtime calibrated no tensor {missing[0]!r}")
    for name, (low, high) in ranges.items():
        data[name] = TensorData(lowest=np.float32(low), highest=np.float32(high))
    save_tensors_data(data, cache_path)


def quantize_onnx(pre_path: str, out_path: str, config: OrtStatic | OrtDynamic,
                  feeds: Sequence[dict[str, np.ndarray]] | None, exclude: Sequence[str],
                  cache_path: str | None) -> NodeCount:
    """Quantize the pre-processed model into ``out_path`` with ``exclude`` kept in float; return
    the node count, after checking that every other compute node was quantized."""
    method = config.METHOD
    wanted = compute_nodes(pre_path)
    unknown = sorted(set(exclude) - set(wanted))
    if unknown:
        raise CtkError(f"nodes_to_exclude names {unknown[0]!r}, which is not a Conv/Gemm/MatMul node of the "
                       f"graph (those are: {', '.join(wanted[:8])}{', ...' if len(wanted) > 8 else ''})")
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs progress and hints at WARNING
    try:
        if isinstance(config, OrtStatic):
            if not feeds:
                raise CtkError("int8 static quantization needs calibration batches")
            quantize_static(pre_path, out_path, Reader(list(feeds)), quant_format=QuantFormat.QDQ,
                            per_channel=config.per_channel, activation_type=ACTIVATIONS[config.activation_type],
                            weight_type=QuantType.QInt8, calibrate_method=CALIBRATORS[config.calibration_method],
                            op_types_to_quantize=list(STATIC_OPS), nodes_to_exclude=list(exclude),
                            calibration_cache_path=cache_path,
                            extra_options={"QDQKeepRemovableActivations": bool(exclude)})
            if exclude:
                float_inputs(out_path, exclude)
        else:
            quantize_dynamic(pre_path, out_path, per_channel=config.per_channel, weight_type=QuantType.QInt8,
                             nodes_to_exclude=list(exclude))
    except CtkError:
        raise
    except Exception as error:
        raise CtkError(f"onnx int8 ({method}): ONNX Runtime's quantizer failed: {summary(error)}") from error
    finally:
        logging.getLogger().setLevel(quiet)
    count = count_int8(out_path, wanted)
    expected = set(exclude) | set(activation_matmuls(pre_path) if method == "dynamic" else ())
    silent = sorted(set(count.float_nodes) - expected)
    if silent:
        raise CtkError(f"onnx int8 ({method}): the quantizer left {len(silent)} of {len(wanted)} Conv/Gemm/MatMul "
                       f"nodes in float that were not excluded: {', '.join(silent[:5])}")
    if not count.quantized:
        raise CtkError(f"onnx int8 ({method}): no Conv/Gemm/MatMul node was quantized (graph has {len(wanted)})")
    return count


def float_inputs(path: str, exclude: Sequence[str]) -> None:
    """Rewire the ``exclude`` nodes of the QDQ model at ``path`` to read float tensors: every
    ``DequantizeLinear(QuantizeLinear(t))`` input becomes ``t``, and the same is done for the
    nodes that compute ``t``, up to Conv/Gemm/MatMul outputs and graph inputs. Other consumers
    keep their quantized copy. Exact only with the Relu/Clip nodes kept
    (``QDQKeepRemovableActivations``): otherwise the Q node is the Relu and ``t`` is before it."""
    model = onnx.load(path)
    producer = {out: node for node in model.graph.node for out in node.output}
    pending = [node for node in model.graph.node if node.name in set(exclude)]
    visited = set()
    while pending:
        node = pending.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        for index, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                continue
            node.input[index] = q.input[0]
            source = producer.get(q.input[0])
            if source is not None and source.op_type not in COMPUTE_OPS:
                pending.append(source)
    _drop_dead_nodes(model.graph)
    onnx.save(model, path)


_QDQ_SUFFIXES = ("_scale", "_zero_point")  # quantize_static's names for a tensor's Q/DQ parameters


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove the Q/DQ pairs nothing reads any more, and their scales and zero points (only
    those: another unread node may be read by a subgraph, which ``node.input`` does not show)."""
    while True:
        used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
        dead = [node for node in graph.node
                if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not used & set(node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    for initializer in [i for i in graph.initializer if i.name not in used and i.name.endswith(_QDQ_SUFFIXES)]:
        graph.initializer.remove(initializer)


def count_int8(path: str, compute: Sequence[str]) -> NodeCount:
    """Which of the ``compute`` nodes (names in the float graph) are quantized in ``path``.

    In QDQ form a node is quantized when its data and weight inputs both come from
    DequantizeLinear; in integer form it has become a ConvInteger/MatMulInteger (named after the
    original by ``quantize_dynamic``). A node that is neither, or missing, counts as float.
    """
    graph = onnx.load(path, load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    by_name = {node.name: node for node in graph.node}
    integer_of = {m["node"] for node in graph.node if node.op_type in INTEGER_OPS
                  and (m := _INTEGER_NAME.match(node.name))}
    quantized, float_nodes = [], []
    for name in compute:
        node = by_name.get(name)
        in_qdq = (node is not None and node.op_type in COMPUTE_OPS and len(node.input) >= 2
                  and all(getattr(producer.get(i), "op_type", None) == "DequantizeLinear" for i in node.input[:2]))
        (quantized if in_qdq or name in integer_of else float_nodes).append(name)
    ops = [node.op_type for node in graph.node]
    qdq = sum(ops.count(op) for op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"))
    return NodeCount(quantized, float_nodes, qdq, sum(ops.count(op) for op in INTEGER_OPS))


def file_size(path: str) -> int:
    return os.path.getsize(path)
