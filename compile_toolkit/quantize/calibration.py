"""Calibration batches: checked against the model's inputs once, then fed to ONNX Runtime.

A batch that does not fit would otherwise fail deep inside ONNX Runtime's calibrator with a
message about an augmented model the user never made, so every batch is checked up front and a
misfit is one line naming the batch, the input and both shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader

from ..capture import Inputs
from ..errors import CtkError
from ..onnx_runtime import session

# ONNX Runtime's input type strings, as the torch dtypes a calibration tensor must have.
_DTYPES = {"tensor(float)": torch.float32, "tensor(double)": torch.float64, "tensor(float16)": torch.float16,
           "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}


def check_batches(batches: Iterable[torch.Tensor | Sequence[torch.Tensor]] | None, onnx_path: str) -> list[Inputs]:
    """The batches as input tuples that fit the ONNX model's inputs: their number, dtypes, ranks
    and every fixed dimension (a symbolic one, such as a dynamic batch, takes any size)."""
    if batches is None:
        raise CtkError("int8 quantization needs calibration batches (calibration=[inputs, ...])")
    signature = [(i.name, i.shape, i.type) for i in session(onnx_path).get_inputs()]
    checked = []
    for index, batch in enumerate(batches):
        inputs = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
        if len(inputs) != len(signature):
            raise CtkError(f"calibration batch {index} has {len(inputs)} inputs; the model takes {len(signature)}")
        for position, (got, (name, shape, kind)) in enumerate(zip(inputs, signature, strict=True)):
            if not isinstance(got, torch.Tensor):
                raise CtkError(f"calibration batch {index}, input {position}: a {type(got).__name__}, not a tensor")
            fits = (got.dtype == _DTYPES.get(kind, got.dtype) and got.dim() == len(shape)
                    and all(not isinstance(want, int) or want == size for size, want in zip(got.shape, shape, strict=True)))
            if not fits:
                expected = [d if isinstance(d, int) else "N" for d in shape]
                raise CtkError(f"calibration batch {index}, input {position} ({name}): shape {list(got.shape)} "
                               f"{got.dtype} does not fit the model's input {expected} {_DTYPES.get(kind, kind)}")
        checked.append(tuple(t.detach().cpu().contiguous() for t in inputs))
    if not checked:
        raise CtkError("calibration data is empty: give at least one batch")
    return checked


def feeds(names: Sequence[str], batches: Sequence[Inputs]) -> list[dict[str, np.ndarray]]:
    """ONNX Runtime feeds, inputs matched to ``names`` by position (the exporter keeps the order)."""
    return [{name: t.numpy() for name, t in zip(names, batch, strict=True)} for batch in batches]


class Reader(CalibrationDataReader):
    """ONNX Runtime's calibration reader over prepared feeds (one pass; ``rewind`` restarts)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = batches
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._batches):
            return None
        self._next += 1
        return self._batches[self._next - 1]

    def __len__(self) -> int:
        return len(self._batches)

    def rewind(self) -> None:
        self._next = 0
