"""Quantization-aware training for int8: fake quantization that simulates exactly what ONNX
Runtime's static int8 (:mod:`.onnx_int8`) will do, so that training can adapt to it.

:func:`prepare_qat` swaps every ``nn.Conv2d`` / ``nn.Linear`` for torch's QAT module
(``torch.ao.nn.qat``: the same ``weight`` and ``bias`` parameters, so masks, optimizers and
checkpoints keep their names) with two ``FakeQuantize`` observers:

- ``weight_fake_quant``: int8 per output channel, symmetric over [-127, 127], from the current
  weights: ONNX Runtime's int8 weights (``WeightSymmetric``). A batch norm folded into the conv
  later scales each output channel, and per-channel symmetric rounding commutes with that, so
  the rounding trained here is the rounding of the folded ONNX weights. A pruned (zero) weight
  fake-quantizes to zero: the masks stay exact.
- ``input_fake_quant``: uint8 per tensor, affine over [0, 255], its range an exponential moving
  average of the batches' min and max while training (frozen in eval mode): ONNX Runtime's
  uint8 activations. That range is what the training learned to live with; :func:`learned_ranges`
  reads it back from a checkpoint, and ``OrtStatic(activation_ranges=...)`` puts it on the
  layer's input in ``model.int8.onnx`` instead of a post-training calibration.

Other conv types (1-d, 3-d, transposed), matmuls and embeddings get no fake quantization.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.ao.nn import qat as qat_nn
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
from torch.ao.quantization.qconfig import QConfig

from ..errors import CtkError

WEIGHT = "weight_fake_quant"
INPUT = "input_fake_quant"
_MIN, _MAX = f".{INPUT}.activation_post_process.min_val", f".{INPUT}.activation_post_process.max_val"
_SWAPS: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: qat_nn.Conv2d, nn.Linear: qat_nn.Linear}

# The recipe of onnx_int8.quantize_static with its defaults (QInt8 weights, QUInt8 activations).
_WEIGHT_FQ = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0,
                                    quant_min=-127, quant_max=127, dtype=torch.qint8,
                                    qscheme=torch.per_channel_symmetric, ch_axis=0)
_INPUT_FQ = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                   dtype=torch.quint8, qscheme=torch.per_tensor_affine)
QCONFIG = QConfig(activation=_INPUT_FQ, weight=_WEIGHT_FQ)


def prepare_qat(model: nn.Module) -> list[str]:
    """Fake-quantize every Conv2d/Linear of ``model`` in place (see the module docstring); return
    their names. CtkError when the model has none: a QAT that quantizes nothing would be silent."""
    swapped = []
    for name, module in list(model.named_modules()):
        target = _SWAPS.get(type(module))
        if target is None:
            continue
        module.qconfig = QCONFIG
        layer = target.from_float(module)
        del module.qconfig
        layer.train(module.training)
        layer.add_module(INPUT, QCONFIG.activation())
        layer.register_forward_pre_hook(_fake_quantize_input)
        layer.to(module.weight.device)  # the observers are made on the CPU
        _set(model, name, layer)
        swapped.append(name)
    if not swapped:
        raise CtkError(f"--qat: {type(model).__name__} has no Conv2d or Linear layer to fake-quantize")
    return swapped


def _fake_quantize_input(layer: nn.Module, args: tuple) -> tuple:
    """The layer's input, fake-quantized; its range moves only in training mode (an evaluation
    between steps must not move it)."""
    fake_quant = getattr(layer, INPUT)
    fake_quant.observer_enabled.fill_(int(layer.training))
    return (fake_quant(args[0]), *args[1:])


def remove_qat(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Put float Conv2d/Linear layers (the trained weights) back in place of the QAT ones and
    return each layer's learned input range, for ``OrtStatic(activation_ranges=...)``."""
    ranges = learned_ranges(model.state_dict())
    for name, module in list(model.named_modules()):
        if isinstance(module, tuple(_SWAPS.values())):
            float_layer = module.to_float()
            float_layer.to(module.weight.device).train(module.training)
            _set(model, name, float_layer)
    return ranges


def is_qat_key(key: str) -> bool:
    return f".{WEIGHT}." in key or f".{INPUT}." in key


def float_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A QAT model's state dict without the fake-quantization buffers: the float model's."""
    return {key: value for key, value in state.items() if not is_qat_key(key)}


def qat_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the fake-quantization buffers of a state dict (what :func:`float_state` leaves out)."""
    return {key: value for key, value in state.items() if is_qat_key(key)}


def learned_ranges(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Layer name -> (min, max) of its input as the training's observer last saw it, from a QAT
    model's state dict (a ``ctk train --qat int8`` checkpoint's model state); empty for a float one.
    A layer that never ran (its observer still at +-inf) is left out."""
    ranges = {}
    for key, low in state.items():
        if key.endswith(_MIN):
            layer = key[: -len(_MIN)]
            high = state[layer + _MAX]
            if low.numel() == 1 and torch.isfinite(low) and torch.isfinite(high):
                ranges[layer] = (float(low), float(high))
    return ranges


def input_qparams(low: float, high: float) -> tuple[float, int]:
    """(scale, zero point) of a uint8 input range, as the fake quantization computes them (and
    ONNX Runtime, from the same range)."""
    observer = MovingAverageMinMaxObserver(quant_min=0, quant_max=255, dtype=torch.quint8)
    observer.min_val, observer.max_val = torch.tensor(low), torch.tensor(high)
    scale, zero_point = observer.calculate_qparams()
    return float(scale), int(zero_point)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise CtkError("--qat: the model itself is a single Conv2d/Linear; wrap it in a module")
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, module)
