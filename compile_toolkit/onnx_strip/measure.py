"""What a strip saved, measured for its report: FLOPs (:mod:`.flops`) and ONNX Runtime latency of
the input file against the output file.

Latency is not timed here: :func:`compile_toolkit.metrics.compare_latency_ms` times both files in
one process, in blocks of runs after an untimed run, the order flipped every round, and takes the
median of per-round ratios, because on a shared machine two separate timings are not comparable
(shared/FACTS.md, timing). The files run on the strip's first sample input, so the batch (a
dynamic one: :data:`~.verify.SYMBOLIC_SIZE`) is the one the outputs were verified on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CtkError
from ..metrics import compare_latency_ms, default_threads
from .verify import Feeds

LATENCY_BUDGET_S = 20.0  # fewer rounds (at least 4) where 20 rounds of both files would take longer
LATENCY_WARMUP = 3  # runs of each file before the rounds; they also size the rounds to the budget


@dataclass(frozen=True)
class OnnxLatency:
    """ONNX Runtime (CPU) latency of the input and the output file on the same inputs: the medians
    of each, and the median of per-round ratios input / output (``speedup``)."""

    before_ms: float
    after_ms: float
    speedup: float
    rounds: int
    threads: int


def compare_latency(before: str | bytes, after: str, feed: Feeds) -> OnnxLatency:
    """Time the input file (a path, or a model's bytes) against the stripped file on ``feed``."""
    threads = default_threads()
    result = compare_latency_ms(before, after, _tensors(feed), threads=threads, warmup=LATENCY_WARMUP,
                                budget_s=LATENCY_BUDGET_S)
    return OnnxLatency(result["a_ms"], result["b_ms"], result["ratio"], int(result["rounds"]), threads)


def sample_shapes(feed: Feeds) -> dict[str, list[int]]:
    """The shapes FLOPs and latency are measured at, for the report."""
    return {name: list(array.shape) for name, array in feed.items()}


def _tensors(feed: Feeds) -> tuple[torch.Tensor, ...]:
    """The feed as the positional tensors the metrics helper takes (it feeds them by the session's
    input order, which is the graph's, as the feed's is)."""
    try:
        return tuple(torch.from_numpy(np.ascontiguousarray(array)) for array in feed.values())
    except TypeError as error:  # a dtype torch lacks (bfloat16 from ml_dtypes)
        raise CtkError(f"latency cannot be measured on inputs of dtype "
                       f"{', '.join(sorted({str(a.dtype) for a in feed.values()}))}: pass latency=False") from error
