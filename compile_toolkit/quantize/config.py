"""One frozen dataclass per way of quantizing, each checked before any work starts.

- :class:`OrtStatic`: ONNX Runtime's static int8 (QDQ pairs, activation ranges calibrated).
- :class:`OrtDynamic`: ONNX Runtime's dynamic int8 (weights ahead of time, activations per batch).
- :class:`OrtAuto`: static where the graph has convolutions, dynamic otherwise; what
  ``--quantize int8`` means.
- :class:`PT2E`: torch's PT2E flow for the ``.pt2`` program (X86InductorQuantizer).
- :class:`QAT`: quantization-aware training, fake int8 in every Conv2d/Linear during ``ctk train``.

The command line, recipe files and the Python API build these; :func:`~.registry.quantize_`
carries out any of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, TypeVar

from ..errors import CtkError

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("uint8", "int8")
QAT_DTYPES = ("int8",)

C = TypeVar("C", bound="OrtInt8")


@dataclass(frozen=True)
class OrtInt8:
    """What ONNX Runtime's int8 quantizers share: how the int8 file is judged and rescued.

    ``max_metric_drop``: the most the task metric (points: accuracy in %, or 100 x output cosine)
    may fall from the float model; ``None`` measures and reports without a limit. When the drop
    is larger and ``mixed_precision`` is on, the layers that lose most are kept in float, at most
    ``max_float_fraction`` of them, until the drop is within the limit.
    ``nodes_to_exclude``: ONNX node names that always stay in float. ``per_channel``: weight
    scales per output channel (else per tensor).
    """

    per_channel: bool = True
    max_metric_drop: float | None = 1.0
    mixed_precision: bool = True
    max_float_fraction: float = 0.5
    nodes_to_exclude: tuple[str, ...] = ()

    def validate(self: C) -> C:
        """Return self, or raise CtkError naming the first bad field."""
        if self.max_metric_drop is not None and not self.max_metric_drop >= 0:
            raise CtkError(f"max metric drop must be >= 0 points, got {self.max_metric_drop}")
        if not 0 <= self.max_float_fraction < 1:
            raise CtkError(f"max_float_fraction must be in [0, 1), got {self.max_float_fraction}")
        return self

    def with_(self: C, **changes: object) -> C:
        return replace(self, **changes).validate()

    def measured_only(self: C) -> C:
        """This config with no limit: the dense model's int8 is measured for comparison, never
        held to the limit the stripped model's is."""
        return self.with_(max_metric_drop=None)


@dataclass(frozen=True)
class _Calibrated(OrtInt8):
    """The fields of static int8, which calibrates activation ranges on input batches.

    ``calibration_method``: how a range is chosen from the calibration batches.
    ``activation_type`` (weights are always int8): ``uint8``, ONNX Runtime's fast x86 path
    (u8 x s8, VNNI): stripped ResNet-50 at batch 1 ran 2.3x faster with uint8 than with int8
    activations. ``activation_ranges``: ``(layer, min, max)`` of layer inputs learned by
    quantization-aware training (:func:`~compile_toolkit.quantize.qat.learned_ranges`), put on
    the inputs of the Conv/Gemm/MatMul nodes whose weight is ``<layer>.weight`` instead of the
    calibrated ones (the other tensors are still calibrated).
    """

    calibration_method: str = "minmax"
    activation_type: str = "uint8"
    activation_ranges: tuple[tuple[str, float, float], ...] = ()

    def validate(self: C) -> C:
        super().validate()
        _check_choice("calibration_method", self.calibration_method, CALIBRATION_METHODS)
        _check_choice("activation_type", self.activation_type, ACTIVATION_TYPES)
        for layer, low, high in self.activation_ranges:
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise CtkError(f"activation range of {layer!r} must be finite with min <= max, got [{low}, {high}]")
        if self.activation_ranges and self.activation_type != "uint8":
            raise CtkError("learned activation ranges are uint8 ranges (what --qat int8 simulates): "
                           f"activation_type must be uint8, got {self.activation_type!r}")
        return self

    def with_ranges(self: C, ranges: Mapping[str, tuple[float, float]]) -> C:
        """This config with the learned input ranges of :func:`~compile_toolkit.quantize.qat.learned_ranges`."""
        return self.with_(activation_ranges=tuple((layer, low, high) for layer, (low, high) in sorted(ranges.items())))

    def measured_only(self: C) -> C:
        """Also without learned ranges: they belong to the trained weights, not the dense model's."""
        return self.with_(max_metric_drop=None, activation_ranges=())


@dataclass(frozen=True)
class OrtStatic(_Calibrated):
    """ONNX Runtime's static int8: QuantizeLinear/DequantizeLinear pairs around every Conv, Gemm
    and MatMul with activation ranges from calibration batches (run as integer kernels)."""

    METHOD: ClassVar[str] = "static"


@dataclass(frozen=True)
class OrtDynamic(OrtInt8):
    """ONNX Runtime's dynamic int8: weights quantized ahead of time, activations per batch at run
    time (MatMulInteger/ConvInteger). No calibration; the usual choice for transformer MatMuls,
    whose activation ranges vary from input to input. MatMuls of two activations stay float."""

    METHOD: ClassVar[str] = "dynamic"


@dataclass(frozen=True)
class OrtAuto(_Calibrated):
    """Static int8 for graphs with convolutions (their ranges calibrate well and QDQ convolutions
    run as integer kernels), dynamic for the others (transformers); the static fields apply when
    static is chosen. Learned activation ranges always mean static."""

    def resolve(self, has_conv: bool) -> OrtStatic | OrtDynamic:
        if has_conv or self.activation_ranges:
            return OrtStatic(**vars(self))
        return OrtDynamic(self.per_channel, self.max_metric_drop, self.mixed_precision, self.max_float_fraction,
                          self.nodes_to_exclude)


@dataclass(frozen=True)
class PT2E:
    """torch's PT2E flow for ``model.int8.pt2``: X86InductorQuantizer (static int8, weights per
    output channel), calibrated on the same batches as ONNX Runtime (:mod:`.pt2_int8`)."""

    def validate(self) -> PT2E:
        return self


@dataclass(frozen=True)
class QAT:
    """Quantization-aware training: every Conv2d/Linear fake-quantized as :class:`OrtStatic`
    quantizes it (:mod:`.qat`), trained by ``ctk train``; the learned input ranges then go on
    the int8 ONNX file (``OrtStatic.activation_ranges``)."""

    dtype: str = "int8"

    def validate(self) -> QAT:
        if self.dtype not in QAT_DTYPES:
            raise CtkError(f"unknown --qat {self.dtype!r}; valid: {', '.join(QAT_DTYPES)}")
        return self


QuantizeConfig = OrtStatic | OrtDynamic | OrtAuto | PT2E | QAT
# What ``quantize="int8"`` (and ``--quantize int8``) stands for: ONNX Runtime's int8 file, and the
# PT2E program where ``pt2`` is exported too.
INT8 = (OrtAuto(), PT2E())


def as_configs(value: str | QuantizeConfig | Sequence[QuantizeConfig]) -> tuple[QuantizeConfig, ...]:
    """What an export quantizes: ``"int8"``, one config or several, validated, at most one ONNX
    Runtime config and one PT2E (:class:`QAT` is a way of training: ``ctk train --qat``)."""
    if isinstance(value, str):
        if value != "int8":
            raise CtkError(f"quantize must be 'int8' or quantization configs, got {value!r}")
        return INT8
    configs = (value,) if not isinstance(value, Sequence) else tuple(value)
    for config in configs:
        if not isinstance(config, OrtInt8 | PT2E):
            raise CtkError(f"quantize takes 'int8' or configs (OrtStatic, OrtDynamic, OrtAuto, PT2E), got "
                           f"{type(config).__name__}" + (" (trained by ctk train --qat int8)" if isinstance(config, QAT)
                                                         else ""))
        config.validate()
    for family in (OrtInt8, PT2E):
        found = [type(c).__name__ for c in configs if isinstance(c, family)]
        if len(found) > 1:
            raise CtkError(f"quantize takes one config of each kind, got {' and '.join(found)}")
    return configs


def ort_config(configs: Sequence[QuantizeConfig]) -> OrtStatic | OrtDynamic | OrtAuto | None:
    """The ONNX Runtime config among ``configs`` (what ``model.int8.onnx`` is made by), if any."""
    return next((c for c in configs if isinstance(c, OrtInt8)), None)


def with_learned_ranges(configs: Sequence[QuantizeConfig],
                        ranges: Mapping[str, tuple[float, float]]) -> tuple[QuantizeConfig, ...]:
    """``configs`` with the ONNX Runtime config given the input ranges quantization-aware training
    learned (:func:`~compile_toolkit.quantize.qat.learned_ranges`); dynamic int8 cannot use them."""
    if not ranges:
        return tuple(configs)
    found = ort_config(configs)
    if not isinstance(found, _Calibrated):
        raise CtkError("learned activation ranges (quantization-aware training) need static int8, not "
                       f"{type(found).__name__}")
    return tuple(found.with_ranges(ranges) if c is found else c for c in configs)


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise CtkError(f"quantize {name} {value!r} is not one of {', '.join(valid)}")
