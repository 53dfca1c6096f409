"""What to quantize and how: one frozen dataclass, checked before any work starts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..errors import CtkError

DTYPES = ("int8",)
METHODS = ("auto", "static", "dynamic")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("uint8", "int8")


@dataclass(frozen=True)
class QuantConfig:
    """Post-training int8 quantization of an ONNX graph (and of the ``.pt2`` program).

    ``method``: ``static`` puts QuantizeLinear/DequantizeLinear pairs around every Conv, Gemm and
    MatMul with activation ranges from calibration batches (ONNX Runtime runs them as integer
    kernels); ``dynamic`` quantizes weights ahead of time and activations per batch at run time
    (MatMulInteger/ConvInteger; no calibration needed, the usual choice for transformer MatMuls,
    whose activation ranges vary from input to input); ``auto`` is static for graphs with
    convolutions and dynamic for the others.

    ``max_metric_drop``: the most the task metric (points: accuracy in %, or 100 x output cosine)
    may fall from the float model; ``None`` measures and reports without a limit. When the drop
    is larger and ``mixed_precision`` is on, the layers that lose most are kept in float, at most
    ``max_float_fraction`` of them, until the drop is within the limit.
    ``nodes_to_exclude``: ONNX node names that always stay in float. ``pt2``: also quantize the
    ``.pt2`` program by PT2E when ``pt2`` is among the exported formats. ``activation_type`` of
    static int8 (weights are always int8): ``uint8``, ONNX Runtime's fast x86 path (u8 x s8,
    VNNI): stripped ResNet-50 at batch 1 ran 2.3x faster with uint8 than with int8 activations.
    ``activation_ranges``: ``(layer, min, max)`` of layer inputs learned by quantization-aware
    training (:func:`~compile_toolkit.quantize.qat.learned_ranges`): static int8 puts them on the
    inputs of the Conv/Gemm/MatMul nodes whose weight is ``<layer>.weight`` instead of the
    calibrated ones (the other tensors are still calibrated).
    """

    dtype: str = "int8"
    method: str = "auto"
    calibration_method: str = "minmax"
    per_channel: bool = True
    max_metric_drop: float | None = 1.0
    mixed_precision: bool = True
    max_float_fraction: float = 0.5
    nodes_to_exclude: tuple[str, ...] = ()
    pt2: bool = True
    activation_type: str = "uint8"
    activation_ranges: tuple[tuple[str, float, float], ...] = ()

    def validate(self) -> QuantConfig:
        """Return self, or raise CtkError naming the first bad field."""
        for name, value, valid in (("dtype", self.dtype, DTYPES), ("method", self.method, METHODS),
                                   ("calibration_method", self.calibration_method, CALIBRATION_METHODS),
                                   ("activation_type", self.activation_type, ACTIVATION_TYPES)):
            if value not in valid:
                raise CtkError(f"quantize {name} {value!r} is not one of {', '.join(valid)}")
        if self.max_metric_drop is not None and not self.max_metric_drop >= 0:
            raise CtkError(f"max metric drop must be >= 0 points, got {self.max_metric_drop}")
        for layer, low, high in self.activation_ranges:
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise CtkError(f"activation range of {layer!r} must be finite with min <= max, got [{low}, {high}]")
        if self.activation_ranges and self.method == "dynamic":
            raise CtkError("learned activation ranges (quantization-aware training) need static int8, not dynamic")
        if self.activation_ranges and self.activation_type != "uint8":
            raise CtkError("learned activation ranges are uint8 ranges (what --qat int8 simulates): "
                           f"activation_type must be uint8, got {self.activation_type!r}")
        if not 0 <= self.max_float_fraction < 1:
            raise CtkError(f"max_float_fraction must be in [0, 1), got {self.max_float_fraction}")
        return self

    def with_(self, **changes: object) -> QuantConfig:
        return replace(self, **changes).validate()

    def with_ranges(self, ranges: Mapping[str, tuple[float, float]]) -> QuantConfig:
        """This config with the learned input ranges of :func:`~compile_toolkit.quantize.qat.learned_ranges`."""
        return self.with_(activation_ranges=tuple((layer, low, high) for layer, (low, high) in sorted(ranges.items())))


def as_config(value: str | QuantConfig) -> QuantConfig:
    """``"int8"`` or a :class:`QuantConfig`, validated."""
    if isinstance(value, QuantConfig):
        return value.validate()
    if isinstance(value, str):
        return QuantConfig(dtype=value).validate()
    raise CtkError(f"quantize must be 'int8' or a QuantConfig, got {type(value).__name__}")
