"""ONNX Runtime sessions on the CPU, and positional inputs fed to them by name.

A module of its own, below both ``exporters`` (which verify ONNX artifacts) and ``quantize``
(which calibrates and judges int8 files): each runs ONNX files, and neither may import the other
to do so.
"""

from __future__ import annotations

import onnxruntime
import torch

from .capture import Inputs
from .errors import CtkError


def session(path: str | bytes, threads: int | None = None) -> onnxruntime.InferenceSession:
    """A CPU InferenceSession of a file (or a serialized model) with ``threads`` intra-op threads (default: as many as torch uses,
    ``torch.get_num_threads()``, so that a process limited to fewer cores keeps ONNX Runtime to
    them too; both default to the machine's cores)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def feeds(sess: onnxruntime.InferenceSession, inputs: Inputs) -> dict[str, object]:
    """Map positional inputs to the session's input names (the exporter keeps their order)."""
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise CtkError(f"onnx model takes {len(names)} inputs, got {len(inputs)}")
    return {name: t.detach().cpu().numpy() for name, t in zip(names, inputs, strict=True)}


def run(path: str, inputs: list[Inputs]) -> list[list[torch.Tensor]]:
    """The outputs of the ONNX file at ``path`` on each batch of ``inputs``, as tensors."""
    sess = session(path)
    return [[torch.from_numpy(o) for o in sess.run(None, feeds(sess, batch))] for batch in inputs]
