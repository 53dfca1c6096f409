"""``quantize_(source, config, data)``: the one verb that carries out any quantization config.

Each config type of :mod:`.config` has one handler, registered for its type with what it
quantizes (``source``: a float ONNX file, a captured program, a module to train) and what it
needs from :class:`QuantData`; a missing need is one error naming the config and the need,
before any work. A new quantizer is a config dataclass and a handler registered here
(docs/architecture.md, "A quantizer").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.export import ExportedProgram
from torch.fx import GraphModule

from ..capture import Inputs
from ..errors import CtkError
from .api import QuantResult, quantize
from .config import PT2E, QAT, OrtInt8, QuantizeConfig
from .evaluate import Metric
from .pt2_int8 import PT2ECount, quantize_program
from .qat import prepare_qat


@dataclass
class QuantData:
    """What a quantizer may read: ``calibration`` (batches of model inputs: static ranges, and the
    data of the default metric), ``metric`` (scores an int8 ONNX file against float), ``out_path``
    (where a quantizer that writes a file writes it)."""

    calibration: list[Inputs] | None = None
    metric: Metric | None = None
    out_path: str | None = None


@dataclass(frozen=True)
class Quantizer:
    """A config type's handler: ``source`` names what it quantizes, ``needs`` the :class:`QuantData`
    fields it reads."""

    handle: Callable[[Any, Any, QuantData], Any]
    source: str
    needs: tuple[str, ...]


_QUANTIZERS: dict[type, Quantizer] = {}


def register(config_type: type, source: str, needs: tuple[str, ...] = ()) -> Callable:
    """Register the handler of ``config_type`` (and its subclasses)."""
    def add(handler: Callable) -> Callable:
        _QUANTIZERS[config_type] = Quantizer(handler, source, needs)
        return handler
    return add


def quantizer(config: QuantizeConfig) -> Quantizer:
    """The registered handler of ``config``'s type (the nearest registered base class)."""
    for kind in type(config).__mro__:
        if kind in _QUANTIZERS:
            return _QUANTIZERS[kind]
    raise CtkError(f"no quantizer for {type(config).__name__}; configs: "
                   f"{', '.join(t.__name__ for t in _QUANTIZERS)}")


def quantize_(source: Any, config: QuantizeConfig, data: QuantData | None = None) -> Any:
    """Quantize ``source`` as ``config`` says: see each handler for what it takes and returns."""
    data = data or QuantData()
    found = quantizer(config.validate())
    missing = [name for name in found.needs if getattr(data, name) is None]
    if missing:
        raise CtkError(f"{type(config).__name__} quantization needs {' and '.join(missing)}")
    return found.handle(source, config, data)


@register(OrtInt8, source="a float ONNX file", needs=("calibration", "out_path"))
def _onnx_runtime(float_onnx: str, config: OrtInt8, data: QuantData) -> QuantResult:
    """``model.int8.onnx`` by ONNX Runtime's quantizer, judged by the metric. Dynamic int8 reads
    the calibration batches too: they are the default metric's data (output cosine to float)."""
    return quantize(float_onnx, data.out_path, data.calibration, config, data.metric)


@register(PT2E, source="a captured program", needs=("calibration",))
def _pt2e(program: ExportedProgram, config: PT2E, data: QuantData) -> tuple[GraphModule, PT2ECount]:
    """The program's module converted by PT2E and the count of what it quantized."""
    return quantize_program(program, data.calibration)


@register(QAT, source="a module to train")
def _qat(module: nn.Module, config: QAT, data: QuantData) -> list[str]:
    """Fake-quantize the module's Conv2d/Linear layers in place for training; their names."""
    return prepare_qat(module)
