"""One layer as an ONNX model, the unit the latency table times: a convolution or a linear layer
at given channel widths, in fp32 or as int8 QDQ (quantize/dequantize pairs around it, weights int8
per output channel, bias int32: the pattern ONNX Runtime's static quantizer writes, which ONNX
Runtime fuses into QLinearConv / QLinearMatMul and OpenVINO reads natively).

ONNX Runtime runs int8 convolutions in NHWC, so a lone int8 layer pays a transpose on each side
that a whole model pays once at its ends; the table keeps that (it grows with the widths like the
activation traffic a model has anyway), and the end-to-end check corrects the total.

Written with ``onnx.helper`` rather than exported from torch: thousands of cells are timed, and a
one-node graph needs no tracer. Weight values do not change a dense kernel's time; they are random
(never zero) so that no runtime can skip work.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..errors import CtkError
from .layers import Geometry

OPSET = 17
PRECISIONS = ("fp32", "int8")
# The uint8 zero point of an int8 layer's input: 0 where the layer reads a ReLU's output (range
# [0, max]: what the static quantizer gives it; ``Geometry.unsigned_input``), 128 for a value
# centred on 0 (an image, a LayerNorm's or a SiLU's output). The zero point changes the kernel: with
# 128, OpenVINO's AMX convolutions pay a zero-point compensation that costs most at padded borders,
# and a lone 3x3 convolution at 56x56, 32 to 32 channels, took 0.10 ms against 0.039-0.048 ms with
# 0, and 0.024-0.036 ms inside ResNet-50, where it reads a ReLU. The output's zero point stays 128:
# with 0, OpenVINO folds the output's dequantize into the convolution, which then writes fp32 where
# inside a model it writes int8 for the next layer (a 1x1 at 56x56: 0.14 against 0.06 ms).
RELU_ZERO_POINT, CENTRED_ZERO_POINT, OUTPUT_ZERO_POINT = 0, 128, 128


def layer_model(geometry: Geometry, cin: int, cout: int, batch: int, precision: str,
                shared_input: bool = False) -> onnx.ModelProto:
    """The layer of ``geometry`` with ``cin`` input and ``cout`` output channels, input batch
    ``batch``, in ``precision`` (:data:`PRECISIONS`). ``shared_input``: in int8, the dequantized
    input is also an output of the graph, as a block's input in a model feeds more than one layer.

    Why OpenVINO needs ``shared_input``: it moves a strided 1x1 convolution's stride onto the
    layer's input when nothing else reads it, and in a lone int8 layer the pooling node it inserts
    there breaks the quantized pattern, so the convolution runs in fp32 (``brgconv_avx512_1x1_f32``
    between a dequantize and a requantize). In ResNet-50 the input of such a convolution (a
    bottleneck's shortcut) also feeds the block's first convolution, the stride stays, and it runs
    in int8 (``brgconv_avx512_amx_1x1_I8``); with the input shared, the lone layer does too. ONNX
    Runtime keeps the plain layer: a dequantize that leaves the graph is not fused into QLinearConv."""
    if precision not in PRECISIONS:
        raise CtkError(f"latency table precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    rng = np.random.default_rng(cin * 100003 + cout)
    builder = _Builder(precision == "int8", RELU_ZERO_POINT if geometry.unsigned_input else CENTRED_ZERO_POINT)
    source = builder.activation("x")
    if geometry.kind == "linear":
        out = builder.linear(source, cin, cout, geometry.bias, rng)
    else:
        out = builder.conv(source, geometry, cin, cout, rng)
    builder.output(out, "y")
    shape = input_shape(geometry, cin, batch)
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared_input and builder.int8:
        outputs.append(helper.make_tensor_value_info(source, TensorProto.FLOAT, shape))
    graph = helper.make_graph(builder.nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              outputs, builder.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def identity_model(geometry: Geometry, cin: int, batch: int) -> onnx.ModelProto:
    """A model that returns its input: boundary nodes only, in which a profiled cell counts nothing."""
    shape = input_shape(geometry, cin, batch)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def input_shape(geometry: Geometry, cin: int, batch: int) -> list[int]:
    if geometry.kind == "linear":
        rows = geometry.spatial[0]
        return [batch, cin] if rows == 1 else [batch, rows, cin]
    return [batch, cin, *geometry.spatial]


def layer_input(geometry: Geometry, cin: int, batch: int) -> tuple[torch.Tensor]:
    """A random input of the layer (the table feeds every timed run the same one)."""
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(input_shape(geometry, cin, batch), generator=generator),)


class _Builder:
    """Nodes and initializers of one layer's graph; with ``int8`` every activation and weight goes
    through a quantize/dequantize pair."""

    def __init__(self, int8: bool, zero_point: int) -> None:
        self.int8, self.zero_point = int8, zero_point
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def activation(self, name: str) -> str:
        """``name`` itself in fp32; quantized to uint8 (at the builder's zero point) and dequantized in int8."""
        if not self.int8:
            return name
        scale = self.constant(f"{name}_scale", np.array(0.05, dtype=np.float32))
        zero = self.constant(f"{name}_zero", np.array(self.zero_point, dtype=np.uint8))
        self.nodes.append(helper.make_node("QuantizeLinear", [name, scale, zero], [f"{name}_q"]))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", scale, zero], [f"{name}_dq"]))
        return f"{name}_dq"

    def weight(self, name: str, value: np.ndarray, axis: int) -> str:
        """``value`` as an fp32 initializer, or int8 with one scale per output channel (``axis``)."""
        if not self.int8:
            return self.constant(name, value.astype(np.float32))
        channels = value.shape[axis]
        quantized = np.clip(np.round(value / 0.01), -127, 127).astype(np.int8)
        self.constant(f"{name}_q", quantized)
        scale = self.constant(f"{name}_scale", np.full(channels, 0.01, dtype=np.float32))
        zero = self.constant(f"{name}_zero", np.zeros(channels, dtype=np.int8))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", scale, zero], [name], axis=axis))
        return name

    def bias(self, name: str, channels: int, rng: np.random.Generator) -> str:
        """An fp32 bias, or in int8 an int32 one at the input scale times the weight scale."""
        value = rng.standard_normal(channels).astype(np.float32)
        if not self.int8:
            return self.constant(name, value)
        self.constant(f"{name}_q", np.round(value / (0.05 * 0.01)).astype(np.int32))
        scale = self.constant(f"{name}_scale", np.full(channels, 0.05 * 0.01, dtype=np.float32))
        zero = self.constant(f"{name}_zero", np.zeros(channels, dtype=np.int32))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", scale, zero], [name], axis=0))
        return name

    def conv(self, source: str, geometry: Geometry, cin: int, cout: int, rng: np.random.Generator) -> str:
        groups = cin if geometry.depthwise else 1
        kernel = rng.standard_normal((cout, cin // groups, *geometry.kernel)).astype(np.float32) + 0.1
        inputs = [source, self.weight("w", kernel, 0)]
        if geometry.bias:
            inputs.append(self.bias("b", cout, rng))
        pads = [geometry.padding[0], geometry.padding[1], geometry.padding[0], geometry.padding[1]]
        self.nodes.append(helper.make_node("Conv", inputs, ["conv"], kernel_shape=list(geometry.kernel),
                                           strides=list(geometry.stride), pads=pads,
                                           dilations=list(geometry.dilation), group=groups))
        return "conv"

    def linear(self, source: str, cin: int, cout: int, bias: bool, rng: np.random.Generator) -> str:
        matrix = rng.standard_normal((cin, cout)).astype(np.float32) + 0.1
        self.nodes.append(helper.make_node("MatMul", [source, self.weight("w", matrix, 1)], ["matmul"]))
        if not bias:
            return "matmul"
        values = rng.standard_normal(cout).astype(np.float32)
        self.nodes.append(helper.make_node("Add", ["matmul", self.constant("b", values)], ["linear"]))
        return "linear"

    def output(self, value: str, name: str) -> None:
        """``value`` as the graph's output ``name`` (requantized first in int8, as between layers)."""
        if self.int8:
            scale = self.constant("y_scale", np.array(0.05, dtype=np.float32))
            zero = self.constant("y_zero", np.array(OUTPUT_ZERO_POINT, dtype=np.uint8))
            self.nodes.append(helper.make_node("QuantizeLinear", [value, scale, zero], ["y_q"]))
            self.nodes.append(helper.make_node("DequantizeLinear", ["y_q", scale, zero], [name]))
        else:
            self.nodes.append(helper.make_node("Identity", [value], [name]))
