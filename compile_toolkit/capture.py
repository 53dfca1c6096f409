"""Capture a model as an ATen-level graph with ``torch.export``, batch dimension dynamic."""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from .errors import CtkError


def capture(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> ExportedProgram:
    """``torch.export`` the model in eval mode; dim 0 of every input may vary (``Dim.AUTO``
    keeps it static where the model itself fixes the batch size)."""
    dynamic = tuple({0: Dim.AUTO} if t.dim() else None for t in example_inputs)
    was_training = model.training
    model.eval()
    try:
        return torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic)
    except Exception as error:  # export reports user-model problems with many exception types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CtkError(f"torch.export could not capture {type(model).__name__}: {first}") from error
    finally:
        model.train(was_training)
