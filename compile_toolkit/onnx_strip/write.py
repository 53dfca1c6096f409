"""Writing the stripped file: only once ONNX Runtime has given the input's outputs from it.

What it is compared with (:class:`Reference`) is the input file's outputs on the sample inputs,
or, for a bfloat16 file ONNX Runtime cannot run on the CPU, the outputs of the input's float32
twin (:mod:`.twin`), against which the stripped file's twin is run. The file is written with its
weights in an external data file (``NAME.data`` beside it) where they would pass
:data:`INLINE_LIMIT_BYTES`: a protobuf message cannot exceed 2 GB. File and data are written in a
hidden folder beside the output, verified there, and moved into place; nothing is left where
verification fails.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from ..errors import CtkError, VerificationError, summary
from ..fileio import remove_path, replace_path, sibling_path
from .twin import float32_feeds, float32_twin
from .verify import Feeds, check_same_outputs, computed_float_dtypes, default_rtol, reference_outputs

INLINE_LIMIT_BYTES = 2**31 - 2**27  # weights above this go to external data: protobuf's 2 GiB, less room for the graph


@dataclass(frozen=True)
class Reference:
    """The input's outputs on ``feeds``; ``twin``: both run as float32 twins (:mod:`.twin`)."""

    expected: list[list[torch.Tensor]]
    feeds: list[Feeds]
    twin: bool

    def tolerance(self, model: ir.Model) -> float:
        """The default tolerance: the precision the graph computes in (its twin's: bfloat16 made
        float32)."""
        return default_rtol(model, bfloat16_as_float32=self.twin)


@dataclass(frozen=True)
class Written:
    """The verified output: its relative error, and its size on disk (file and external data)."""

    max_relative_error: float
    file_bytes: int
    external_data: Path | None


def reference_of(name: str, source: str | bytes, model: ir.Model, feeds: list[Feeds]) -> Reference:
    """The input's outputs (``source``: its path or bytes; ``model``: it loaded, shapes inferred,
    not yet stripped). A file ONNX Runtime cannot run is run as its float32 twin where it holds
    bfloat16, and refused in one line otherwise (``name`` says which file)."""
    try:
        return Reference(reference_outputs(source, feeds), feeds, twin=False)
    except CtkError:
        raise
    except Exception as error:  # noqa: BLE001 - the runtime's refusal of the user's file, in one line
        refusal = summary(error)
    if ir.DataType.BFLOAT16 not in _dtypes(model):
        raise CtkError(f"ONNX Runtime cannot run {name}, so no strip of it can be verified: {refusal}")
    twin_feeds = float32_feeds(feeds)
    try:
        return Reference(reference_outputs(float32_twin(model), twin_feeds), twin_feeds, twin=True)
    except CtkError:
        raise
    except Exception as error:  # noqa: BLE001 - the twin's refusal too: nothing can be verified
        raise CtkError(f"{name} computes in bfloat16, which ONNX Runtime cannot run on the CPU ({refusal}), and "
                       f"neither its float32 twin ({summary(error)}): no strip of it can be verified") from error


def _dtypes(model: ir.Model) -> set[ir.DataType]:
    return {d for d in (computed_float_dtypes(model) | {v.dtype for v in model.graph.initializers.values()})
            if d is not None}


def write_verified(model: ir.Model, out_path: str | os.PathLike, source_valid: bool, ref: Reference,
                   tolerance: float) -> Written:
    """Save the stripped model at ``out_path`` only once ONNX Runtime gives the input's outputs
    from it (and ``onnx.checker`` passes it, where it passes the input)."""
    out = Path(out_path)
    data = f"{out.name}.data" if weight_bytes(model) > INLINE_LIMIT_BYTES else None
    folder = sibling_path(out, "tmp")
    folder.mkdir()
    try:
        tmp = folder / out.name
        if data is None:
            ir.save(model, tmp)
        else:
            ir.save(model, tmp, external_data=data)
        problem = checker_error(str(tmp)) if source_valid else None
        if problem is not None:
            raise VerificationError(f"the stripped ONNX file is not valid ONNX (its source is): {problem}")
        error = check_same_outputs(ref.expected, _runnable(tmp, ref.twin), ref.feeds, tolerance)
        size = sum(p.stat().st_size for p in folder.iterdir())
        if data is not None:
            replace_path(folder / data, out.parent / data)
        replace_path(tmp, out)
    finally:
        remove_path(folder)
    return Written(error, size, None if data is None else out.parent / data)


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the main graph's initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _runnable(path: Path, twin: bool) -> str | bytes:
    """What ONNX Runtime runs to check the written file: the file, or its float32 twin."""
    if not twin:
        return str(path)
    written = ir.load(path)
    ir.external_data.load_to_model(written)
    return float32_twin(written)


def checker_error(model: str | bytes) -> str | None:
    """What ``onnx.checker`` finds wrong with a model, or ``None``. The output is held to the
    checker only where its source passes it: files from other tools often do not."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        return summary(error)
    return None

