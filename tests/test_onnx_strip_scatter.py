"""``ScatterND``: an in-place write into a slice (``bias[n:2n].zero_()``, Swin V2's key bias) is a
scatter of updates onto constant rows; a row whose weights are zero and whose bias the scatter
zeroes is a zero channel, stripped as ``ctk.strip`` strips it, the indices renumbered. Positive
controls: a scatter writing ones keeps those rows; indices written twice, a reduction, and
indices computed from the input are barriers named in the report, and nothing is removed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from test_onnx_strip import export, hand_model, initializer_shapes, node, weights
from torch import nn
from torch.nn import functional as F

import compile_toolkit as ctk
from compile_toolkit.onnx_strip import strip_onnx


class WrittenBias(nn.Module):
    """``fc1`` (8 -> 24) with the middle third of its bias overwritten by ``fill`` in the forward,
    as torchvision's ``ShiftedWindowAttentionV2`` zeroes its key bias; ReLU; ``fc2`` (24 -> 8).
    Rows 2, 9 and 10 of ``fc1.weight`` are zero, and the bias of row 2 (rows 9 and 10 keep theirs:
    only the write makes them zero)."""

    def __init__(self, fill: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fill, self.fc1, self.fc2 = fill, nn.Linear(8, 24), nn.Linear(24, 8)
        with torch.no_grad():
            self.fc1.weight[[2, 9, 10]] = 0
            self.fc1.bias[2] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.fc1.bias.clone()
        n = bias.numel() // 3
        bias[n:2 * n].fill_(self.fill)
        return self.fc2(F.relu(F.linear(x, self.fc1.weight, bias)))


def scattered(path) -> tuple[tuple[int, ...], list[int]]:
    """The shape of the scatter's data (the bias) and its indices' values."""
    model = onnx.load(str(path))
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            constants[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    (scatter,) = [n for n in model.graph.node if n.op_type == "ScatterND"]
    producer = {o: n for n in model.graph.node for o in n.output}
    indices = scatter.input[1]
    if indices not in constants:  # as exported: Unsqueeze(Constant) (the strip writes a constant)
        indices = producer[indices].input[0]
    return tuple(constants[scatter.input[0]].shape), constants[indices].ravel().tolist()


@pytest.mark.parametrize("fill, removed", [(0.0, [2, 9, 10]), (1.0, [2])], ids=["zeroed", "ones-control"])
def test_a_bias_slice_written_in_the_forward_loses_its_zero_rows(tmp_path, fill, removed):
    """Zeroed: rows 9 and 10 (weights zero, bias zeroed by the scatter) go with row 2, ``fc1``
    keeping 21 rows (``ctk.strip`` removes row 2, at most as many as this), the scatter's 8 rows (8..15) renumbered to the 6 kept
    (7..12) and the file exact at another batch. Written with ones (positive control): rows 9 and
    10 output ReLU(1) whatever the input, not zero, and stay."""
    model, x = WrittenBias(fill).eval(), torch.randn(2, 8)
    source = export(model, x, tmp_path / "written.onnx", dynamo=False)
    assert scattered(source) == ((24,), list(range(8, 16)))
    summary = strip_onnx(source, tmp_path / "small.onnx", latency=False)
    assert summary.max_relative_error <= 1e-5
    assert summary.channels_removed == len(removed)
    shapes = initializer_shapes(tmp_path / "small.onnx")
    rows = 24 - len(removed)
    assert (shapes["fc1.weight"], shapes["fc2.weight"]) == ((rows, 8), (8, rows))
    kept = [r for r in range(8, 16) if r not in removed]
    assert scattered(tmp_path / "small.onnx") == ((rows,), [r - sum(g < r for g in removed) for r in kept])
    # ctk.strip removes row 2 too; today it keeps rows 9 and 10 (it reads the bias parameter, not the write)
    assert rows <= ctk.strip(model, (x,)).fc1.weight.shape[0] <= 23
    other = torch.randn(5, 8)
    session = onnxruntime.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    [out] = session.run(None, {"x": other.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(other).numpy(), rtol=1e-5, atol=1e-5)


def scattered_bias(indices: str, updates: np.ndarray, **attrs) -> onnx.ModelProto:
    """``x @ a`` (column 1 of ``a`` zero), plus ``ScatterND(b, indices, updates)`` (``b`` nonzero
    everywhere; ``idx`` writes rows 1 and 4, ``idx2`` row 1 twice), ReLU, ``@ c``: column 1 is
    zero only through the scatter's zero update."""
    a = weights(4, 6)
    a[:, 1] = 0
    constants = {"idx": np.array([[1], [4]], dtype=np.int64), "idx2": np.array([[1], [1]], dtype=np.int64)}
    return hand_model([
        node("MatMul", ["x", "a"], "h"), node("ScatterND", ["b", indices, "u"], "s", **attrs),
        node("Add", ["h", "s"], "t"), node("Relu", ["t"], "r"), node("MatMul", ["r", "c"], "y"),
    ], {"x": ["batch", 4]}, {"a": a, "b": weights(6) + 5, "c": weights(6, 3), "u": updates,
                             **{k: v for k, v in constants.items() if k == indices}})


ROWS = np.array([0.0, 3.0], dtype=np.float32)  # row 1 written zero, row 4 written 3


def test_a_hand_written_scatter_of_a_zero_row_strips_it(tmp_path):
    """Column 1 goes from ``a``, ``b`` and ``c``; the update written to it goes, and the one
    written to row 4 is now written to row 3."""
    onnx.save(scattered_bias("idx", ROWS), tmp_path / "m.onnx")
    summary = strip_onnx(tmp_path / "m.onnx", tmp_path / "small.onnx", latency=False)
    assert summary.max_relative_error <= 1e-5 and summary.channels_removed == 1
    shapes = initializer_shapes(tmp_path / "small.onnx")
    assert (shapes["a"], shapes["b"], shapes["c"]) == ((4, 5), (5,), (5, 3))
    model = onnx.load(str(tmp_path / "small.onnx"))
    (scatter,) = [n for n in model.graph.node if n.op_type == "ScatterND"]
    written = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert written[scatter.input[1]].ravel().tolist() == [3] and written[scatter.input[2]].tolist() == [3.0]
    assert not any("ScatterND" in b for b in summary.barriers)


def dynamic_indices() -> onnx.ModelProto:
    """The indices read from the model's input: ``[[argmax(x[0, :1])]]``, always ``[[0]]`` in
    value but not provably so."""
    model = scattered_bias("k", ROWS[:1])
    model.graph.node.insert(0, node("Slice", ["x", "zero", "one", "one"], "first"))
    model.graph.node.insert(1, node("ArgMax", ["first"], "arg", axis=1, keepdims=1))
    model.graph.node.insert(2, node("Slice", ["arg", "zero", "one", "zero"], "k"))
    for name, value in (("zero", [0]), ("one", [1])):
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    return model


@pytest.mark.parametrize("model, reason", [
    (lambda: scattered_bias("idx2", np.zeros(2, np.float32)), "written twice"),
    (lambda: scattered_bias("idx", ROWS, reduction="add"), "reduction 'add'"),
    (dynamic_indices, "computed from the model's inputs"),
], ids=["duplicate", "reduction", "dynamic"])
def test_a_scatter_it_cannot_prove_is_a_named_barrier(tmp_path, model, reason):
    """Positive controls: the same zero column, behind a scatter whose rows are not provably
    each written once by a plain write, is kept, and the report says why."""
    onnx.save(model(), tmp_path / "m.onnx")
    summary = strip_onnx(tmp_path / "m.onnx", tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == 0 and summary.parameters_after == summary.parameters_before
    assert any("ScatterND" in b and reason in b for b in summary.barriers), summary.barriers
