"""How good an int8 model is, judged by the task's metric rather than by exactness.

A quantized model cannot match the float model to float rounding, so the check that every other
artifact passes (``atol + rtol * max|reference|``) does not apply. Instead a :class:`Metric`
scores an ONNX file in points (higher is better): accuracy in % where the task has labels, else
100 x the mean cosine similarity of the outputs to the float model's on the calibration batches.
The deviations of the outputs are reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..capture import Inputs
from ..onnx_runtime import session
from ..passes.verify import deviation as verify_deviation
from .calibration import feeds


@dataclass(frozen=True)
class Metric:
    """``score(onnx_path)`` in points, higher is better; ``name`` says what it measures."""

    name: str
    score: Callable[[str], float]


def run_onnx(path: str, batches: Sequence[Inputs]) -> list[list[np.ndarray]]:
    """Every output of ``path`` on every batch, in ONNX Runtime (CPU)."""
    sess = session(path)
    names = [i.name for i in sess.get_inputs()]
    return [sess.run(None, feed) for feed in feeds(names, batches)]


def accuracy_metric(x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> Metric:
    """Top-1 accuracy in % of the first output on labelled data."""

    def score(path: str) -> float:
        batches = [(x[i:i + batch_size],) for i in range(0, len(x), batch_size)]
        logits = np.concatenate([out[0] for out in run_onnx(path, batches)])
        return 100.0 * float((logits.argmax(axis=1) == y.numpy()).mean())

    return Metric("accuracy (%)", score)


def fidelity_metric(float_path: str, batches: Sequence[Inputs]) -> Metric:
    """100 x mean cosine similarity, per sample, of all outputs to the float model's: for
    tasks without labels (embeddings, logits of unlabelled inputs). The float model scores 100."""
    reference = run_onnx(float_path, batches)

    def score(path: str) -> float:
        cosines = [_cosine(a, b) for got, want in zip(run_onnx(path, batches), reference, strict=True)
                   for a, b in zip(got, want, strict=True)]
        return 100.0 * float(np.mean(np.concatenate(cosines)))

    return Metric("output cosine to float (x100)", score)


def deviation(float_path: str, int8_path: str, batches: Sequence[Inputs]) -> dict[str, float]:
    """Max and mean absolute difference of every float output, int8 against float: a measurement
    (int8 is judged by the task metric), its maximum by the verifier's rule
    (:func:`~compile_toolkit.passes.verify.deviation`: a NaN or infinity int8 made is infinite)."""
    pairs = [(torch.from_numpy(np.asarray(want)), torch.from_numpy(np.asarray(got)))
             for gots, wants in zip(run_onnx(int8_path, batches), run_onnx(float_path, batches), strict=True)
             for got, want in zip(gots, wants, strict=True) if np.asarray(want).dtype.kind == "f"]
    if not pairs:
        return {"max_abs_deviation": 0.0, "mean_abs_deviation": 0.0}
    worst = verify_deviation([[want for want, _ in pairs]], [[got for _, got in pairs]]).max_abs
    mean = float(torch.cat([(got.double() - want.double()).abs().ravel() for want, got in pairs]).mean())
    return {"max_abs_deviation": worst, "mean_abs_deviation": mean}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64) if a.ndim else a.reshape(1, 1)
    b = b.reshape(b.shape[0], -1).astype(np.float64) if b.ndim else b.reshape(1, 1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-30), 1.0)
