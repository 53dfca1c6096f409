"""``model.sparse.onnx``: the ONNX model with its mostly-zero weights stored as sparse initializers.

Why: unstructured and N:M pruning leave their zeros inside dense tensors, so the exported file is
as large as the dense model's. ONNX's ``sparse_initializer`` stores only the nonzero values and
their linear positions, which shrinks the file (download, storage). ONNX Runtime turns every sparse
initializer back into a dense tensor when it creates the session, so memory use and latency are
those of the dense file: this is a size optimisation only.

The ONNX standard requires int64 indices, so each kept value costs its own bytes plus 8. A tensor
is converted only when that is smaller than its dense bytes: for float32 above 2/3 zeros, so a
50%-sparse or 2:4 model keeps its dense tensors and its file does not shrink.
"""

from __future__ import annotations

import os
import time

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import CtkError, VerificationError, summary
from . import onnx_format
from .artifact import Artifact, size_on_disk
from .checks import CheckSet
from .staging import staged

FILENAME = "model.sparse.onnx"
FORMAT = "onnx-sparse"
INDEX_BYTES = 8  # int64, the only index type onnx.checker accepts


def sparsify(model: onnx.ModelProto) -> list[str]:
    """Move every top-level initializer whose sparse form is smaller into ``sparse_initializer``,
    in place; return the names moved. Initializers that are also graph inputs (overridable at run
    time) are left dense: a sparse initializer cannot be fed."""
    graph = model.graph
    inputs = {value.name for value in graph.input}
    kept, moved = [], []
    for tensor in graph.initializer:
        sparse = None if tensor.name in inputs else _sparse_form(tensor)
        if sparse is None:
            kept.append(tensor)
        else:
            graph.sparse_initializer.append(sparse)
            moved.append(tensor.name)
    if moved:
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return moved


def _sparse_form(tensor: onnx.TensorProto) -> onnx.SparseTensorProto | None:
    """The tensor as (values, linear int64 indices) if that takes fewer bytes, else None."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    array = numpy_helper.to_array(tensor)
    flat = array.reshape(-1)
    nonzero = np.flatnonzero(flat)
    if len(nonzero) * (array.itemsize + INDEX_BYTES) >= flat.size * array.itemsize:
        return None
    values = numpy_helper.from_array(flat[nonzero], tensor.name)
    indices = numpy_helper.from_array(nonzero.astype(np.int64), f"{tensor.name}_indices")
    return onnx.helper.make_sparse_tensor(values, indices, list(array.shape))


def export_sparse(dense: Artifact, checks: CheckSet, out_dir: str) -> Artifact:
    """Write ``out_dir/model.sparse.onnx`` from the verified dense ONNX artifact ``dense`` and
    verify it in ONNX Runtime on the same check inputs (the same bound as every artifact).

    It is written even when no tensor gains from the sparse form (its size then equals the
    dense file's): asking for it and finding it missing would be worse than a ratio of 1.
    """
    started = time.perf_counter()
    try:
        model = onnx.load(dense.path)
    except Exception as error:  # a truncated or foreign file at the path the exporter wrote
        raise CtkError(f"{FORMAT}: cannot read {dense.path}: {summary(error)}") from error
    sparsify(model)
    if model.ByteSize() > onnx_format.INLINE_LIMIT:
        raise CtkError(f"{FORMAT}: the model is {model.ByteSize() / 2**30:.1f} GiB with sparse initializers, over the "
                       "2 GiB protobuf allows in one file (sparse initializers are not stored as external data); "
                       "use model.onnx and its model.onnx.data")
    indices = [i for i in range(len(checks.inputs))
               if dense.static_batch is None or checks.inputs[i][0].shape[0] == dense.static_batch]
    with staged(out_dir, FILENAME) as tmp:
        onnx.save(model, tmp)
        try:
            onnx.checker.check_model(tmp)
            outputs = onnx_format.run(tmp, [checks.inputs[i] for i in indices])
        except Exception as error:
            raise VerificationError(f"{FORMAT}: {onnx_format.RUNTIME} could not run the artifact: "
                                    f"{summary(error)}") from error
        max_error = checks.max_error(FORMAT, indices, outputs)
    path = os.path.join(out_dir, FILENAME)
    return Artifact(FORMAT, path, size_on_disk(path), max_error, onnx_format.RUNTIME,
                    static_batch=dense.static_batch, seconds=time.perf_counter() - started)
