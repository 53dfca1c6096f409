"""``ctk.strip_onnx``: remove the zero and dead channels of an ONNX file made anywhere, verified in
ONNX Runtime against the input file before the output is put in place."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from ..errors import CtkError, VerificationError, summary
from ..fileio import staged_path
from ..passes.strip import StripGroup
from .rewrite import StripChannels
from .verify import check_same_outputs, reference_outputs, sample_feeds

Source = str | os.PathLike | ir.Model | onnx.ModelProto


@dataclass(frozen=True)
class OnnxStripSummary:
    """What an ONNX strip removed and what kept the rest. ``groups`` and ``barriers`` read like
    :class:`~compile_toolkit.passes.strip.StripSummary`'s (carriers are ``initializer:dim``);
    parameters count the elements of the graph's initializers; ``max_relative_error`` is the
    output file's error against the input in ONNX Runtime."""

    channels_removed: int
    groups: list[StripGroup]
    barriers: list[str]
    parameters_before: int
    parameters_after: int
    file_bytes_before: int
    file_bytes_after: int
    max_relative_error: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form that reports store."""
        return asdict(self)


def strip_onnx(source: Source, out_path: str | os.PathLike, rtol: float = 1e-5, samples: int = 3,
               seed: int = 0) -> OnnxStripSummary:
    """Write a smaller ONNX file to ``out_path`` that computes what ``source`` (a path, an
    ``onnx.ModelProto`` or an ``onnx_ir.Model``) computes; the source is never modified.

    The output is written under a hidden name beside ``out_path``, checked with
    ``onnx.checker``, run in ONNX Runtime on ``samples`` seeded inputs built from the graph's
    input types, and compared with the source's outputs; a drift beyond ``rtol`` of the largest
    output raises :class:`~compile_toolkit.errors.VerificationError` and nothing is written.
    """
    start = time.perf_counter()
    reference = _reference(source, out_path)
    model = _private_copy(source, reference)
    size_before = _stored_bytes(reference, model)
    ir.external_data.load_to_model(model)
    feeds = sample_feeds(model, samples, seed)
    expected = reference_outputs(reference, feeds)
    source_valid = _checker_error(reference) is None
    before = parameter_count(model)
    ShapeInferencePass(strict_mode=False)(model)
    result = StripChannels()(model)
    with staged_path(out_path) as tmp:
        ir.save(model, tmp)
        problem = _checker_error(str(tmp)) if source_valid else None
        if problem is not None:
            raise VerificationError(f"the stripped ONNX file is not valid ONNX (its source is): {problem}")
        error = check_same_outputs(expected, str(tmp), feeds, rtol)
    analysis = result.analysis
    groups = [StripGroup(g.carriers, g.size, g.size - g.removable, g.pinned_reason) for g in analysis.groups]
    return OnnxStripSummary(
        channels_removed=analysis.channels_removed,
        groups=groups,
        barriers=analysis.barriers,
        parameters_before=before,
        parameters_after=parameter_count(model),
        file_bytes_before=size_before,
        file_bytes_after=os.path.getsize(out_path),
        max_relative_error=error,
        seconds=time.perf_counter() - start,
    )


def parameter_count(model: ir.Model) -> int:
    """Elements in the main graph's initializers (those a caller cannot override as inputs)."""
    return sum(math.prod(v.shape.numpy()) for v in model.graph.initializers.values()
               if v.shape is not None and not v.is_graph_input())


def _checker_error(model: str | bytes) -> str | None:
    """What ``onnx.checker`` finds wrong with a model, or ``None``. The output is held to the
    checker only where its source passes it: files from other tools often do not."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        return summary(error)
    return None


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
        raise CtkError(f"cannot read ONNX model {source if isinstance(reference, str) else '(in memory)'}: "
                       f"{summary(error)}") from error
