"""``.pt2``: the ``torch.export`` program itself, verified through ``torch.export.load``."""

from __future__ import annotations

import warnings

import torch

from ..capture import Capture, Inputs
from .checks import flatten_outputs

FILENAME = "model.pt2"
RUNTIME = f"torch.export.load (torch {torch.__version__})"


def write(capture: Capture, path: str) -> None:
    # A file object, because torch.export.save warns about paths not ending in ".pt2".
    with open(path, "wb") as file:
        torch.export.save(capture.program, file)


def run(path: str, inputs: list[Inputs]) -> list[list[torch.Tensor]]:
    with warnings.catch_warnings():
        # load_pt2 wraps read-only bytes in tensors and warns; nothing writes to the weights.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        with open(path, "rb") as file:  # a file object: load warns about paths not ending in .pt2
            module = torch.export.load(file).module()
    with torch.no_grad():
        return [flatten_outputs(module(*batch)) for batch in inputs]
