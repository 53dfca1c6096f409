"""The compute layers of a captured graph whose cost the choice of widths changes, read from the
graph itself: each convolution and linear layer with its geometry (input spatial size, kernel,
stride, padding, dilation, depthwise or not) and, for its input and output channels, which coupled
groups they belong to.

Why from the graph and not the modules: a layer's latency depends on the shapes it runs at (the
input's spatial size after every stride before it), which only the captured graph states, and the
channels a group's width removes are those the channel analysis couples, not one module's.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import hint_int

from ..channels import ChannelAnalysis

_CONVOLUTIONS = {torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default}
_LINEARS = {torch.ops.aten.linear.default}
_aten = torch.ops.aten
# Ops whose output is never negative, ops with a lower bound argument (non-negative when it is),
# and ops whose output is non-negative when their inputs are (pooling, reshaping, concatenation).
_NON_NEGATIVE = {_aten.relu.default, _aten.relu_.default, _aten.relu6.default, _aten.sigmoid.default,
                 _aten.hardsigmoid.default}
_LOWER_BOUNDED = {_aten.hardtanh.default, _aten.hardtanh_.default, _aten.clamp.default, _aten.clamp_min.default}
_SIGN_KEEPING = {_aten.max_pool2d.default, _aten.max_pool2d_with_indices.default, _aten.avg_pool2d.default,
                 _aten.adaptive_avg_pool2d.default, _aten.mean.dim, _aten.flatten.using_ints, _aten.view.default,
                 _aten.reshape.default, _aten.permute.default, _aten.transpose.int, _aten.clone.default,
                 _aten.contiguous.default, _aten.dropout.default, _aten.cat.default, operator.getitem}


@dataclass(frozen=True)
class Geometry:
    """What a layer's latency depends on besides its channel widths. ``spatial``: the input's
    (height, width) for a convolution, the rows per sample (tokens) for a linear layer."""

    kind: str  # "conv" or "linear"
    spatial: tuple[int, ...]
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    depthwise: bool = False  # one group per channel: in and out widths are one width
    bias: bool = True
    # The input is never negative (a ReLU's output): quantized to int8 at zero point 0, which the
    # runtimes' int8 kernels run without a zero-point compensation (:mod:`.onnx_layer`).
    unsigned_input: bool = False

    def key(self) -> str:
        """The table's name for layers of this geometry (equal geometries are measured once)."""
        sign = f"|u{int(self.unsigned_input)}"
        if self.kind == "linear":
            return f"linear|rows{self.spatial[0]}|bias{int(self.bias)}{sign}"
        size = "x".join(map(str, self.spatial))
        return (f"conv|{size}|k{self.kernel[0]}x{self.kernel[1]}|s{self.stride[0]}x{self.stride[1]}"
                f"|p{self.padding[0]}x{self.padding[1]}|d{self.dilation[0]}x{self.dilation[1]}"
                f"|dw{int(self.depthwise)}|bias{int(self.bias)}{sign}")

    def output_spatial(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return self.spatial
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d
                     in zip(self.spatial, self.kernel, self.stride, self.padding, self.dilation, strict=True))

    def flops(self, cin: int, cout: int) -> int:
        """FLOPs of one sample (a multiply-add is 2, as ``torch.utils.flop_counter`` counts)."""
        if self.kind == "linear":
            return 2 * self.spatial[0] * cin * cout
        per_output = (1 if self.depthwise else cin) * self.kernel[0] * self.kernel[1]
        return 2 * math.prod(self.output_spatial()) * cout * per_output


@dataclass(frozen=True)
class Dim:
    """A layer's input or output channels: ``fixed`` channels no group choice removes, and
    ``parts``, (group position, channels of that group in this dim)."""

    fixed: int
    parts: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return self.fixed + sum(count for _, count in self.parts)

    def width(self, widths: Sequence[int], sizes: Sequence[int]) -> int:
        """Channels left when each group keeps ``widths[g]`` of its ``sizes[g]`` (a group spread
        over several dims loses its channels in proportion)."""
        if len(self.parts) == 1 and not self.fixed:
            g, count = self.parts[0]
            if count == sizes[g]:
                return int(widths[g])
        return self.fixed + round(sum(count * widths[g] / sizes[g] for g, count in self.parts))

    def groups(self) -> list[int]:
        return [g for g, _ in self.parts]


@dataclass(frozen=True)
class Layer:
    """One convolution or linear layer: its weight's name, geometry and channel dims."""

    name: str
    geometry: Geometry
    cin: Dim
    cout: Dim

    def groups(self) -> set[int]:
        return set(self.cin.groups()) | set(self.cout.groups())


def compute_layers(analysis: ChannelAnalysis, group_positions: dict[int, int]) -> list[Layer]:
    """Every 2-D convolution and linear layer of ``analysis``'s graph whose weight is a parameter
    or constant of it; ``group_positions`` maps a channel group's index to its position among the
    groups whose widths are chosen (other groups' channels count as fixed). Grouped convolutions
    other than depthwise are left out: their cost is not a function of two widths."""
    group_of = np.full(analysis.components.count, -1, dtype=np.int64)
    for group in analysis.groups:
        if group.index in group_positions:
            group_of[group.components] = group_positions[group.index]
    layers = []
    for node in analysis.gm.graph.nodes:
        layer = _layer(analysis, group_of, node)
        if layer is not None:
            layers.append(layer)
    return layers


def _layer(analysis: ChannelAnalysis, group_of: np.ndarray, node: fx.Node) -> Layer | None:
    if node.op != "call_function" or node.target not in _CONVOLUTIONS | _LINEARS:
        return None
    source, weight = node.args[0], node.args[1]
    if not (isinstance(source, fx.Node) and isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    shape = _example_shape(source)
    if shape is None:
        return None
    has_bias = len(node.args) > 2 and node.args[2] is not None
    if node.target in _LINEARS:
        geometry = Geometry("linear", (math.prod(shape[1:-1]),), bias=has_bias,
                            unsigned_input=non_negative(source))
        channel_dim = len(shape) - 1
    else:
        geometry = _conv_geometry(node, shape, has_bias)
        if geometry is None:
            return None
        geometry = replace(geometry, unsigned_input=non_negative(source))
        channel_dim = 1
    cin = _dim(analysis, group_of, source, channel_dim)
    cout = _dim(analysis, group_of, node, channel_dim)
    if cin is None or cout is None:
        return None
    return Layer(str(weight.target), geometry, cin, cout)


def non_negative(node: fx.Node) -> bool:
    """Whether ``node``'s value is never negative by its op: a ReLU (or a clamp at 0 or above, a
    sigmoid), or pooling, reshaping or concatenating such values. A graph input, a normalisation's
    or a SiLU's output is not: its int8 zero point lies inside its range."""
    if node.op != "call_function":
        return False
    if node.target in _NON_NEGATIVE:
        return True
    if node.target in _LOWER_BOUNDED:
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min", node.kwargs.get("min_val", -1.0))
        return isinstance(low, int | float) and low >= 0
    if node.target in _SIGN_KEEPING:
        inputs = node.args[0] if node.target == _aten.cat.default else node.args[:1]
        return bool(inputs) and all(isinstance(a, fx.Node) and non_negative(a) for a in inputs)
    return False


def _example_shape(node: fx.Node) -> tuple[int, ...] | None:
    """``node``'s shape at the example inputs: a dynamic size (a text model's sequence length) at
    the example's value, which is what the probes time; None where a size has no such value."""
    try:
        return tuple(hint_int(size) for size in node.meta["val"].shape)
    except (TypeError, ValueError, RuntimeError, AttributeError):
        return None


def _conv_geometry(node: fx.Node, shape: tuple, has_bias: bool) -> Geometry | None:
    """A 2-D convolution's geometry, or None for a transposed, 1-D/3-D or grouped (not depthwise) one."""
    if len(shape) != 4:
        return None
    args = list(node.args) + [None] * 9
    if node.target == torch.ops.aten.convolution.default:
        stride, padding, dilation, transposed, groups = args[3], args[4], args[5], args[6], args[8]
        if transposed:
            return None
    else:
        stride, padding, dilation, groups = args[3] or [1, 1], args[4] or [0, 0], args[5] or [1, 1], args[6] or 1
    if isinstance(padding, str):
        return None  # "same"/"valid": rare, and the exported ONNX pads differ
    out_channels = tuple(node.meta["val"].shape)[1]
    depthwise = groups == shape[1] == out_channels and groups > 1
    if groups != 1 and not depthwise:
        return None
    kernel = tuple(node.args[1].meta["val"].shape[2:])
    return Geometry("conv", tuple(shape[2:]), kernel, _pair(stride), _pair(padding), _pair(dilation), depthwise,
                    has_bias)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    values = [value] if isinstance(value, int) else list(value)
    return (int(values[0]), int(values[-1]))


def _dim(analysis: ChannelAnalysis, group_of: np.ndarray, node: fx.Node, dim: int) -> Dim | None:
    """The groups of dim ``dim`` of ``node``'s value, or None where the analysis did not see it."""
    atoms = analysis.ctx.atoms.get((node, None))
    if atoms is None or dim >= len(atoms) or atoms[dim] is None:
        return None
    positions = group_of[analysis.components.labels[atoms[dim]]]
    chosen, counts = np.unique(positions[positions >= 0], return_counts=True)
    return Dim(int((positions < 0).sum()), tuple((int(g), int(c)) for g, c in zip(chosen, counts, strict=True)))
