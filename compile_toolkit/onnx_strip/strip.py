"""``ctk.strip_onnx``: remove the zero and dead channels of an ONNX file made anywhere, verified in
ONNX Runtime against the input file before the output is put in place."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import CtkError, summary
from ..passes.strip import StripGroup
from .contrib_shapes import infer_shapes
from .flops import COUNTED, count_flops
from .measure import OnnxLatency, compare_latency, sample_shapes
from .rewrite import StripChannels
from .verify import sample_feeds
from .write import checker_error, reference_of, write_verified

Source = str | os.PathLike | ir.Model | onnx.ModelProto


@dataclass(frozen=True)
class OnnxStripSummary:
    """What an ONNX strip removed and what kept the rest, and what it saved. ``groups`` and
    ``barriers`` read like :class:`~compile_toolkit.passes.strip.StripSummary`'s (carriers are
    ``initializer:dim``); parameters count the elements of the graph's initializers; FLOPs count
    the ops in ``flops_ops`` (:mod:`.flops`; ``flops_uncounted`` names nodes whose shapes were not
    known) for one run on inputs of ``sample_shapes``, where ``latency`` (``None`` when not asked
    for) was measured too; ``max_relative_error`` is the output file's error against the input in
    ONNX Runtime, within ``tolerance``; ``verified_on`` says what ran there: ``"file"`` (the input
    and the output), or ``"float32 twin"`` (a bfloat16 file ONNX Runtime cannot run on the CPU,
    verified by running float32 twins of both, :mod:`.twin`; its latency is not measured);
    ``external_data``: the output's weights file (``None`` when they are inline); ``weight_dtypes``
    are the floating dtypes of the initializers, which the output keeps; ``seconds`` is the strip
    and its verification (the measurements not included)."""

    channels_removed: int
    groups: list[StripGroup]
    barriers: list[str]
    parameters_before: int
    parameters_after: int
    flops_before: int
    flops_after: int
    flops_ops: list[str]
    flops_uncounted: list[str]
    file_bytes_before: int
    file_bytes_after: int
    latency: OnnxLatency | None
    sample_shapes: dict[str, list[int]]
    max_relative_error: float
    tolerance: float
    weight_dtypes: list[str]
    seconds: float
    verified_on: str = "file"
    external_data: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form that reports store."""
        return asdict(self)


def strip_onnx(source: Source, out_path: str | os.PathLike, rtol: float | None = None, samples: int = 3,
               seed: int = 0, latency: bool = True) -> OnnxStripSummary:
    """Write a smaller ONNX file to ``out_path`` that computes what ``source`` (a path, an
    ``onnx.ModelProto`` or an ``onnx_ir.Model``) computes; the source is never modified.

    The output is written under a hidden name beside ``out_path``, checked with
    ``onnx.checker``, run in ONNX Runtime on ``samples`` seeded inputs built from the graph's
    input types, and compared with the source's outputs; a drift beyond ``rtol`` of the largest
    output raises :class:`~compile_toolkit.errors.VerificationError` and nothing is written.
    ``rtol`` defaults to the precision the graph computes in (:func:`~.verify.default_rtol`:
    1e-5 for float32, 9.8e-3 for float16). A bfloat16 file ONNX Runtime cannot run (its CPU
    provider has no bfloat16 convolution) is verified on float32 twins of the input and the
    output (:mod:`.twin`), at float32's tolerance, and written in bfloat16; any other file ONNX
    Runtime cannot run is refused: no strip of it could be verified. Weights beyond
    :data:`~.write.INLINE_LIMIT_BYTES` are written to ``OUT.data`` beside the output.

    ``latency``: also time the input against the output in ONNX Runtime (up to about
    :data:`~.measure.LATENCY_BUDGET_S` seconds; :func:`~.measure.compare_latency`); the rest of the
    summary costs a shape inference.
    """
    start = time.perf_counter()
    path = _reference(source, out_path)
    model = _private_copy(source, path)
    size_before = _stored_bytes(path, model)
    ir.external_data.load_to_model(model)
    infer_shapes(model)
    feeds = sample_feeds(model, samples, seed)
    ref = reference_of(_name(source, path), path, model, feeds)
    before = parameter_count(model)
    tolerance = ref.tolerance(model) if rtol is None else rtol
    result = StripChannels()(model)
    written = write_verified(model, out_path, checker_error(path) is None, ref, tolerance)
    seconds = time.perf_counter() - start
    analysis = result.analysis
    flops_before, flops_after = count_flops(path, feeds[0]), count_flops(str(out_path), feeds[0])
    return OnnxStripSummary(
        channels_removed=analysis.channels_removed,
        groups=[StripGroup(g.carriers, g.size, g.size - g.removable, g.pinned_reason) for g in analysis.groups],
        barriers=analysis.barriers,
        parameters_before=before,
        parameters_after=parameter_count(model),
        flops_before=flops_before.flops,
        flops_after=flops_after.flops,
        flops_ops=list(COUNTED),
        flops_uncounted=sorted(set(flops_before.uncounted) | set(flops_after.uncounted)),
        file_bytes_before=size_before,
        file_bytes_after=written.file_bytes,
        latency=compare_latency(path, str(out_path), feeds[0]) if latency and not ref.twin else None,
        sample_shapes=sample_shapes(feeds[0]),
        max_relative_error=written.max_relative_error,
        tolerance=tolerance,
        weight_dtypes=weight_dtypes(model),
        seconds=seconds,
        verified_on="float32 twin" if ref.twin else "file",
        external_data=None if written.external_data is None else str(written.external_data),
    )


def parameter_count(model: ir.Model) -> int:
    """Elements in the main graph's initializers (those a caller cannot override as inputs)."""
    return sum(math.prod(v.shape.numpy()) for v in model.graph.initializers.values()
               if v.shape is not None and not v.is_graph_input())


def weight_dtypes(model: ir.Model) -> list[str]:
    """The floating dtypes of the main graph's initializers (``float32``, ``float16``, ``bfloat16``)."""
    found = {v.dtype for v in model.graph.initializers.values() if v.dtype is not None and v.dtype.is_floating_point()}
    return sorted(str(np.dtype(d.numpy())) for d in found)


def _name(source: Source, reference: str | bytes) -> str:
    """How errors name the source: its path, or that it was given in memory."""
    return f"ONNX file {source}" if isinstance(reference, str) else "the ONNX model given in memory"


def _reference(source: Source, out_path: str | os.PathLike) -> str | bytes:
    """What ONNX Runtime runs as the reference: the file itself, or the model's bytes."""
    if isinstance(source, ir.Model):
        return ir.to_proto(source).SerializeToString()
    if isinstance(source, onnx.ModelProto):
        return source.SerializeToString()
    path = Path(source)
    if not path.is_file():
        raise CtkError(f"ONNX file {path} does not exist")
    out = Path(out_path)
    if out.exists() and out.resolve() == path.resolve():
        raise CtkError(f"the output {out} is the input file; the input is never modified: choose another path")
    return str(path)


def _stored_bytes(reference: str | bytes, model: ir.Model) -> int:
    """The source's size: its bytes, or the file plus the external data files it names."""
    if isinstance(reference, bytes):
        return len(reference)
    path = Path(reference)
    data = {Path(v.const_value.base_dir or path.parent) / v.const_value.location
            for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)}
    return path.stat().st_size + sum(f.stat().st_size for f in data if f.is_file())


def _private_copy(source: Source, reference: str | bytes) -> ir.Model:
    """A model the strip may edit: loaded from the file, or from the caller's model's bytes."""
    try:
        if isinstance(reference, bytes):
            return ir.from_proto(onnx.load_from_string(reference))
        return ir.load(reference)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's to fix, in one line
        raise CtkError(f"cannot read {_name(source, reference)}: {summary(error)}") from error
