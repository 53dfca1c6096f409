"""Sparse ONNX initializers: smaller file, same numbers in ONNX Runtime, dense where sparse would
not pay, and clear errors for a misuse."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.exporters.sparse_onnx import sparsify
from compile_toolkit.onnx_runtime import feeds, session


def _zero_fraction(tensor: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = tensor.copy()
    out[rng.random(out.shape) < fraction] = 0
    return out


def _matmul_model(weights: dict[str, np.ndarray], graph_input: str | None = None) -> onnx.ModelProto:
    """y = ((x @ A) @ B) @ C with the given weights as initializers (one optionally also an input)."""
    names = list(weights)
    nodes, current = [], "x"
    for i, name in enumerate(names):
        out = "y" if i == len(names) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, name], [out]))
        current = out
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])]
    if graph_input is not None:
        inputs.append(helper.make_tensor_value_info(graph_input, TensorProto.FLOAT, [32, 32]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])]
    initializers = [numpy_helper.from_array(w, n) for n, w in weights.items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    sess = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_sparsify_moves_only_tensors_that_shrink_and_keeps_results_exact():
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((32, 32)).astype(np.float32)
    weights = {"a90": _zero_fraction(dense, 0.9, 1), "b50": _zero_fraction(dense, 0.5, 2),
               "c90_input": _zero_fraction(dense, 0.9, 3)}
    model = _matmul_model(weights, graph_input="c90_input")
    x = rng.standard_normal((5, 32)).astype(np.float32)
    want = _run(model, x)

    moved = sparsify(model)

    # 90% zeros: 10% x (4 + 8) bytes < 4 bytes per element; 50% zeros would cost 6 > 4 bytes;
    # an initializer that is also a graph input can be fed at run time, so it stays dense.
    assert moved == ["a90"]
    assert [t.name for t in model.graph.initializer] == ["b50", "c90_input"]
    (sparse,) = model.graph.sparse_initializer
    assert list(sparse.dims) == [32, 32] and sparse.indices.data_type == TensorProto.INT64
    assert len(numpy_helper.to_array(sparse.values)) == int(np.count_nonzero(weights["a90"]))
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(_run(model, x), want)


def _sparse_mlp(fraction: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            layer.weight[torch.rand_like(layer.weight) < fraction] = 0
    return model


def test_export_sparse_onnx_is_smaller_verified_and_equal_to_dense(tmp_path):
    model = _sparse_mlp(0.9)
    x = torch.randn(4, 64)

    artifacts = ctk.export(model, (x,), str(tmp_path), formats=("onnx",), sparse_onnx=True)

    dense, sparse = artifacts
    assert (dense.format, sparse.format) == ("onnx", "onnx-sparse")
    assert sparse.path == str(tmp_path / "model.sparse.onnx") and os.path.isfile(sparse.path)
    assert sparse.size_bytes == os.path.getsize(sparse.path)
    # The weights are ~99% of the file; 10% of them at 12 bytes each instead of 4: about 0.3x.
    assert 0.2 < sparse.size_bytes / dense.size_bytes < 0.4
    assert sparse.max_abs_error <= 1e-4 and sparse.static_batch is None
    matrices = {t.name for t in onnx.load(dense.path).graph.initializer if len(t.dims) == 2}
    assert {s.values.name for s in onnx.load(sparse.path).graph.sparse_initializer} == matrices
    batch = (torch.randn(7, 64),)
    dense_sess, sparse_sess = session(dense.path), session(sparse.path)
    np.testing.assert_array_equal(sparse_sess.run(None, feeds(sparse_sess, batch))[0],
                                  dense_sess.run(None, feeds(dense_sess, batch))[0])
    torch.testing.assert_close(torch.from_numpy(sparse_sess.run(None, feeds(sparse_sess, batch))[0]),
                               model(*batch), atol=1e-5, rtol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.sparse.onnx"]  # no temporaries left


def test_export_sparse_onnx_at_half_sparsity_stays_dense(tmp_path):
    artifacts = ctk.export(_sparse_mlp(0.5), (torch.randn(4, 64),), str(tmp_path), formats=("onnx",), sparse_onnx=True)
    dense, sparse = artifacts
    assert not onnx.load(sparse.path).graph.sparse_initializer
    assert sparse.size_bytes == pytest.approx(dense.size_bytes, rel=0.01)


def test_sparse_onnx_without_onnx_format_names_the_option(tmp_path):
    with pytest.raises(ctk.CtkError, match="sparse_onnx.*'onnx'"):
        ctk.export(_sparse_mlp(0.9), (torch.randn(4, 64),), str(tmp_path), formats=("torchscript",), sparse_onnx=True)
    assert not (tmp_path / "model.pt").exists()
