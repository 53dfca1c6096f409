"""``strip_onnx`` on files exported here by ``torch.onnx`` (the TorchScript exporter, which keeps
BatchNormalization with ``do_constant_folding=False`` and shares equal initializers through
``Identity`` nodes, and the dynamo exporter, which folds BN into the convolutions and writes
external data): zeros from ``ctk.prune`` and by hand are removed exactly in ONNX Runtime, and
every case where nothing may go is a positive control that nothing does."""

from __future__ import annotations

import copy
import hashlib
import warnings

import numpy as np
import onnx
import onnx_ir
import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import compile_toolkit as ctk
from compile_toolkit.errors import CtkError, VerificationError
from compile_toolkit.onnx_strip import strip_onnx
from compile_toolkit.onnx_strip.rules import elementwise


def export(model: nn.Module, x: torch.Tensor, path, dynamo: bool) -> str:
    """The model's ONNX file; the TorchScript exporter keeps BN unfused and the batch dynamic."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["x"], verbose=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
    return str(path)


def initializer_shapes(path) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in onnx.load(str(path)).graph.initializer}


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


class ResidualCNN(nn.Module):
    """Conv-BN-ReLU, a depthwise and a pointwise conv added back onto the stream (residual add),
    then a conv with HardSwish, global pooling, flatten and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.pw, self.bn3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.conv4, self.bn4 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn3(self.pw(F.relu(self.bn2(self.dw(x))))))
        x = F.hardswish(self.bn4(self.conv4(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def zeroed_cnn() -> ResidualCNN:
    """Stream channels 1 and 5 zero (conv1, the depthwise conv and the pointwise conv write
    zeros there, BN shifts zero) and conv4's channel 3 dead (the classifier ignores it):
    three channels, one of them a depthwise group."""
    model = ResidualCNN().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn3, model.bn4):  # BN statistics and affine of a trained model
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        for c in (1, 5):
            for conv in (model.conv1, model.dw, model.pw):
                conv.weight[c] = 0
                conv.bias[c] = 0
            for bn in (model.bn1, model.bn2, model.bn3):
                bn.bias[c] = 0
                bn.running_mean[c] = 0
        model.fc.weight[:, 3] = 0
    return model


@pytest.mark.parametrize("dynamo", [False, True])
def test_residual_cnn_loses_its_zero_and_dead_channels(tmp_path, dynamo):
    model, x = zeroed_cnn(), torch.randn(2, 3, 8, 8)
    source = export(model, x, tmp_path / "cnn.onnx", dynamo)
    before = digest(source)
    summary = strip_onnx(source, tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == 3
    assert summary.parameters_after < summary.parameters_before
    assert summary.max_relative_error <= 1e-5
    assert digest(source) == before  # the input file is never modified
    shapes = initializer_shapes(tmp_path / "small.onnx")
    assert shapes["fc.weight"] == (10, 15)
    graph = onnx.load(str(tmp_path / "small.onnx")).graph
    depthwise = next(n for n in graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1
                                                                           for a in n.attribute))
    assert next(a.i for a in depthwise.attribute if a.name == "group") == 6  # two groups went with their channels
    ops = {n.op_type for n in onnx.load(source).graph.node}
    assert ("BatchNormalization" in ops) is not dynamo  # dynamo folds BN into the convs; the other keeps it


@pytest.fixture(scope="module")
def pruned_resnet18(tmp_path_factory):
    """torchvision resnet18 (random weights) with half its channel groups zeroed by ctk.prune."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    ctk.prune(model, (x,), 0.5, "channel")
    return model, x, tmp_path_factory.mktemp("resnet18")


@pytest.mark.parametrize("dynamo", [False, True])
def test_pruned_resnet18_strips_like_ctk_strip(pruned_resnet18, dynamo):
    """Every convolution and the classifier keep exactly the channels ``ctk.strip`` keeps on the
    PyTorch model (the dynamo exporter names the folded conv weights like the modules)."""
    model, x, folder = pruned_resnet18
    source = export(model, x, folder / f"r18_{dynamo}.onnx", dynamo)
    summary = strip_onnx(source, folder / f"r18_{dynamo}.small.onnx", latency=False)
    assert summary.channels_removed > 0 and summary.barriers == ["model input x", "model output"]
    assert summary.parameters_after < 0.3 * summary.parameters_before
    assert summary.max_relative_error <= 1e-5
    assert summary.file_bytes_after < 0.3 * summary.file_bytes_before
    stripped = ctk.strip(model, (x,))
    expected = {name: tuple(p.shape) for name, p in stripped.named_parameters() if name.endswith("weight")
                and p.dim() in (2, 4)}
    shapes = initializer_shapes(folder / f"r18_{dynamo}.small.onnx")
    assert {name: shapes[name] for name in expected} == expected


def float_initializer_types(path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path)).graph.initializer if t.data_type not in (
        onnx.TensorProto.INT64, onnx.TensorProto.INT32)}


@pytest.mark.parametrize("dynamo", [False, True])
def test_float16_resnet18_strips_as_the_float32_one(pruned_resnet18, dynamo):
    """The same pruned model exported in float16 (``.half()``): the zero channels are found in the
    float16 weights, every weight keeps the float32 file's stripped shape and stays float16, and
    the output is verified at float16's tolerance (20 units of 2**-11; float32's is 1e-5)."""
    model, x, folder = pruned_resnet18
    full = strip_onnx(export(model, x, folder / f"f32_{dynamo}.onnx", dynamo), folder / f"f32_{dynamo}.small.onnx",
                      latency=False)
    half = copy.deepcopy(model).half()
    source = export(half, x.half(), folder / f"f16_{dynamo}.onnx", dynamo)
    summary = strip_onnx(source, folder / f"f16_{dynamo}.small.onnx", latency=False)
    assert summary.channels_removed == full.channels_removed > 0
    assert (summary.parameters_before, summary.parameters_after) == (full.parameters_before, full.parameters_after)
    assert initializer_shapes(folder / f"f16_{dynamo}.small.onnx") == initializer_shapes(folder / f"f32_{dynamo}.small.onnx")
    assert float_initializer_types(folder / f"f16_{dynamo}.small.onnx") == {onnx.TensorProto.FLOAT16}
    assert summary.weight_dtypes == ["float16"] and full.weight_dtypes == ["float32"]
    assert (summary.tolerance, full.tolerance) == (20 * 2.0**-11, 1e-5)
    assert summary.max_relative_error <= summary.tolerance


def test_a_wrong_zero_fact_is_caught_at_float16_tolerance(tmp_path, monkeypatch):
    """Positive control for the looser float16 tolerance: claiming sigmoid keeps zeros removes a
    channel that reads 0.5, and the float16 strip is refused all the same."""
    block = Block(nn.Sigmoid()).eval().half()
    source = export(block, torch.randn(2, 3, 6, 6).half(), tmp_path / "block.onnx", dynamo=False)
    assert strip_onnx(source, tmp_path / "honest.onnx", latency=False).channels_removed == 0
    monkeypatch.setattr(elementwise, "keeps_zero", lambda ctx, node: True)
    with pytest.raises(VerificationError, match="max relative error"):
        strip_onnx(source, tmp_path / "small.onnx", latency=False)
    assert not (tmp_path / "small.onnx").exists()


def bfloat16_model(cast_to_float: bool) -> onnx.ModelProto:
    """Conv -> Relu -> Conv with bfloat16 weights (opset 22, whose Conv takes bfloat16); channel 1
    of the first conv is zero. ``cast_to_float``: the graph casts the weights to float32 and
    computes in float32, which ONNX Runtime runs; otherwise it computes in bfloat16."""
    import ml_dtypes
    from onnx import TensorProto, helper

    a, b = weights(4, 3, 1, 1), weights(2, 4, 1, 1)
    a[1] = 0
    tensors = [onnx_ir.serde.serialize_tensor(onnx_ir.tensor(w.astype(ml_dtypes.bfloat16), name=n))
               for n, w in (("a", a), ("b", b))]
    read = ["af", "bf"] if cast_to_float else ["a", "b"]
    nodes = [node("Cast", ["a"], "af", to=TensorProto.FLOAT), node("Cast", ["b"], "bf", to=TensorProto.FLOAT)] \
        if cast_to_float else []
    nodes += [node("Conv", ["x", read[0]], "h"), node("Relu", ["h"], "r"), node("Conv", ["r", read[1]], "y")]
    dtype = TensorProto.FLOAT if cast_to_float else TensorProto.BFLOAT16
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, ["n", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", dtype, None)], tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])


def test_bfloat16_weights_cast_to_float32_are_verified_on_the_file(tmp_path):
    """bfloat16 weights that the graph casts to float32 run in ONNX Runtime: the file itself is
    verified, and its weights stay bfloat16 (a graph computing in bfloat16 is verified on float32
    twins: test_onnx_strip_bfloat16.py)."""
    summary = strip_onnx(bfloat16_model(cast_to_float=True), tmp_path / "cast.onnx", latency=False)
    assert summary.channels_removed == 1 and summary.max_relative_error <= 1e-5 and summary.tolerance == 1e-5
    assert initializer_shapes(tmp_path / "cast.onnx") == {"a": (3, 3, 1, 1), "b": (2, 3, 1, 1)}
    assert float_initializer_types(tmp_path / "cast.onnx") == {onnx.TensorProto.BFLOAT16}
    assert summary.weight_dtypes == ["bfloat16"] and summary.verified_on == "file"


def test_mlp_on_matrices_gemm(tmp_path):
    """TorchScript export of 2-d input: Gemm layers; a zero neuron of fc1 (GELU keeps 0) and a
    neuron of fc2 that fc3 ignores both go."""
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[0].weight[7] = 0
        model[0].bias[7] = 0
        model[4].weight[:, 9] = 0
    source = export(model, torch.randn(3, 16), tmp_path / "mlp.onnx", dynamo=False)
    summary = strip_onnx(source, tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == 2
    assert initializer_shapes(tmp_path / "small.onnx") == {"0.weight": (31, 16), "0.bias": (31,), "2.weight": (31, 31),
                                                            "2.bias": (31,), "4.weight": (4, 31), "4.bias": (4,)}
    assert summary.max_relative_error <= 1e-5


def test_mlp_on_sequences_matmul(tmp_path):
    """dynamo export of 3-d input: MatMul by a matrix plus Add; the same two neurons go."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[0].weight[7] = 0
        model[0].bias[7] = 0
        model[4].weight[:, 9] = 0
    source = export(model, torch.randn(2, 5, 16), tmp_path / "mlp.onnx", dynamo=True)
    assert "MatMul" in {n.op_type for n in onnx.load(source).graph.node}
    summary = strip_onnx(source, tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == 2
    assert summary.max_relative_error <= 1e-5


class Block(nn.Module):
    """conv -> BN -> ``act`` -> conv, with the first conv's channel 0 zero."""

    def __init__(self, act, shift: float = 0.0) -> None:
        super().__init__()
        self.a, self.bn, self.b, self.act = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), act
        with torch.no_grad():
            self.a.weight[0] = 0
            self.a.bias[0] = 0
            self.bn.bias[0] = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.bn(self.a(x))))


def strip_block(tmp_path, block: nn.Module):
    source = export(block, torch.randn(2, 3, 6, 6), tmp_path / "block.onnx", dynamo=False)
    return strip_onnx(source, tmp_path / "small.onnx", latency=False)


@pytest.mark.parametrize("act, removable", [
    (nn.ReLU(), True), (nn.Hardswish(), True), (nn.LeakyReLU(0.1), True), (nn.GELU(), True),
    (nn.Hardtanh(-1.0, 1.0), True),
    (nn.Sigmoid(), False),  # sigmoid(0) = 0.5
    (nn.Hardtanh(0.5, 1.0), False),  # Clip with min 0.5 lifts the zero channel
    (nn.Hardsigmoid(), False),  # hardsigmoid(0) = 0.5
])
def test_zero_facts_are_exact_per_activation(tmp_path, act, removable):
    summary = strip_block(tmp_path, Block(act))
    assert summary.channels_removed == int(removable)
    assert summary.max_relative_error <= 1e-5


def test_zero_channel_followed_by_a_shifting_batch_norm_stays(tmp_path):
    """BN adds its shift to the zero channel: the next conv reads a constant, not zero."""
    assert strip_block(tmp_path, Block(nn.ReLU(), shift=0.5)).channels_removed == 0


def test_an_op_without_a_rule_pins_its_channels_and_is_named(tmp_path):
    class Scan(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block(nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.block.act(self.block.bn(self.block.a(x)))
            return self.block.b(torch.cumsum(y, dim=1))  # channel 0 of a cumsum is no channel

    summary = strip_block(tmp_path, Scan())
    assert summary.channels_removed == 0
    assert any(b.startswith("no channel rule for CumSum at node") for b in summary.barriers)
    assert any(g.kept_because and "CumSum" in g.kept_because for g in summary.groups)


def test_a_wrong_zero_fact_is_caught_by_verification_and_nothing_is_written(tmp_path, monkeypatch):
    """Positive control for the verifier: claim sigmoid keeps zeros, and the strip must fail."""
    monkeypatch.setattr(elementwise, "keeps_zero", lambda ctx, node: True)
    with pytest.raises(VerificationError, match="max relative error"):
        strip_block(tmp_path, Block(nn.Sigmoid()))
    assert not (tmp_path / "small.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["block.onnx"]


def test_models_in_memory_and_refusals(tmp_path):
    source = export(Block(nn.ReLU()), torch.randn(2, 3, 6, 6), tmp_path / "block.onnx", dynamo=False)
    proto = onnx.load(source)
    kept = proto.SerializeToString()
    summary = strip_onnx(proto, tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == 1 and proto.SerializeToString() == kept
    model = onnx_ir.load(source)
    as_loaded = onnx_ir.to_proto(model).SerializeToString()
    assert strip_onnx(model, tmp_path / "small_ir.onnx", latency=False).channels_removed == 1
    assert onnx_ir.to_proto(model).SerializeToString() == as_loaded
    with pytest.raises(CtkError, match="is the input file"):
        strip_onnx(source, source, latency=False)
    with pytest.raises(CtkError, match="does not exist"):
        strip_onnx(tmp_path / "missing.onnx", tmp_path / "out.onnx", latency=False)


def test_dynamic_batch_survives(tmp_path):
    source = export(zeroed_cnn(), torch.randn(2, 3, 8, 8), tmp_path / "cnn.onnx", dynamo=False)
    strip_onnx(source, tmp_path / "small.onnx", latency=False)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)})
    assert out.shape == (5, 10)


# -- hand-built graphs: one rule at a time, exact shapes and attributes ----------------------------

def hand_model(nodes: list, inputs: dict[str, list], weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A float model with inputs of the given shapes (strings: symbolic) and output ``y``."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(a), name) for name, a in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def node(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    return onnx.helper.make_node(op, inputs, [output], name=output, **attrs)


def weights(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def test_depthwise_with_multiplier_and_grouped_conv_lose_whole_groups_and_positions(tmp_path):
    """Input channels 1 and 5 zero: the depthwise conv (2 outputs per group) loses groups 1 and 5,
    and the grouped conv (2 groups of 8) loses positions 2 and 3 of both of its groups."""
    a, dw, g = weights(8, 4, 1, 1), weights(16, 1, 3, 3), weights(4, 8, 1, 1)
    a[[1, 5]] = 0
    dw_bias = weights(16)
    dw_bias[[2, 3, 10, 11]] = 0
    model = hand_model([
        node("Conv", ["x", "a"], "h"), node("Relu", ["h"], "r"),
        node("Conv", ["r", "dw", "dwb"], "d", group=8, pads=[1, 1, 1, 1]), node("Relu", ["d"], "s"),
        node("Conv", ["s", "g"], "y", group=2),
    ], {"x": ["batch", 4, 6, 6]}, {"a": a, "dw": dw, "dwb": dw_bias, "g": g})
    summary = strip_onnx(model, tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == 1 and summary.max_relative_error <= 1e-5  # one coupled component
    shapes = initializer_shapes(tmp_path / "small.onnx")
    assert shapes == {"a": (6, 4, 1, 1), "dw": (12, 1, 3, 3), "dwb": (12,), "g": (4, 6, 1, 1)}
    groups = {n.name: n.attribute[0].i for n in onnx.load(str(tmp_path / "small.onnx")).graph.node
              if n.op_type == "Conv" and n.attribute}
    assert groups == {"d": 6, "y": 2}


def test_a_shared_initializer_is_cut_per_use(tmp_path):
    """One weight read by two convs whose consumers ignore different channels: each use gets its
    own sliced copy (exporters share equal initializers between unrelated layers)."""
    w, left, right = weights(4, 3, 1, 1), weights(2, 4, 1, 1), weights(2, 4, 1, 1)
    left[:, 0] = 0
    right[:, 1] = 0
    model = hand_model([
        node("Conv", ["x", "w"], "h1"), node("Relu", ["h1"], "r1"), node("Conv", ["r1", "left"], "o1"),
        node("Conv", ["x", "w"], "h2"), node("Relu", ["h2"], "r2"), node("Conv", ["r2", "right"], "o2"),
        node("Add", ["o1", "o2"], "y"),
    ], {"x": ["batch", 3, 5, 5]}, {"w": w, "left": left, "right": right})
    summary = strip_onnx(model, tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == 2 and summary.max_relative_error <= 1e-5
    shapes = initializer_shapes(tmp_path / "small.onnx")
    assert "w" not in shapes and sorted(s for n, s in shapes.items() if n.startswith("w")) == [(3, 3, 1, 1)] * 2


def test_concat_transpose_and_matmul_carry_channels(tmp_path):
    """Channel 2 of the first branch, concatenated, moved last by Transpose and read by MatMul."""
    a, b, m = weights(6, 3, 1, 1), weights(2, 3, 1, 1), weights(8, 5)
    a[2] = 0
    model = hand_model([
        node("Conv", ["x", "a"], "h1"), node("Conv", ["x", "b"], "h2"), node("Concat", ["h1", "h2"], "c", axis=1),
        node("Transpose", ["c"], "t", perm=[0, 2, 3, 1]), node("MatMul", ["t", "m"], "y"),
    ], {"x": ["batch", 3, 4, 4]}, {"a": a, "b": b, "m": m})
    summary = strip_onnx(model, tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == 1 and summary.max_relative_error <= 1e-5
    assert initializer_shapes(tmp_path / "small.onnx") == {"a": (5, 3, 1, 1), "b": (2, 3, 1, 1), "m": (7, 5)}


def test_reshape_targets_are_rewritten_and_sums_lose_zero_elements(tmp_path):
    """``Reshape [0, 0, -1]`` keeps the channel dim; the zero channel then vanishes from a
    ReduceSum over channels (zero adds nothing) and from the Gemm reading the other branch."""
    a, fc = weights(8, 3, 1, 1), weights(5, 8)
    a[2] = 0
    shape = np.array([0, 0, -1], dtype=np.int64)
    model = hand_model([
        node("Conv", ["x", "a"], "h"), node("Reshape", ["h", "shape"], "r"),
        node("ReduceSum", ["r", "axes"], "s", keepdims=0), node("Gemm", ["s", "fc"], "g", transB=1),
        node("ReduceSum", ["r", "all"], "total", keepdims=1), node("Add", ["g", "total"], "y"),
    ], {"x": [2, 3, 4, 4]}, {"a": a, "fc": fc, "shape": shape, "axes": np.array([2], dtype=np.int64),
                             "all": np.array([1, 2], dtype=np.int64)})
    summary = strip_onnx(model, tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == 1 and summary.max_relative_error <= 1e-5
    out = onnx.load(str(tmp_path / "small.onnx"))
    target = next(t for t in out.graph.initializer if t.name == "shape")
    assert onnx.numpy_helper.to_array(target).tolist() == [0, 7, -1]
    assert initializer_shapes(tmp_path / "small.onnx")["fc"] == (5, 7)


def test_ctk_strip_of_an_onnx_file(tmp_path, capsys):
    """``ctk strip model.onnx --out smaller.onnx``: the smaller file, its report beside it, the
    input untouched; misuse is one line."""
    import json

    from test_cli import assert_clean_failure, run_cli

    source = export(zeroed_cnn(), torch.randn(2, 3, 8, 8), tmp_path / "cnn.onnx", dynamo=False)
    before = digest(source)
    out = tmp_path / "small.onnx"
    status, _ = run_cli(["strip", source, "--out", str(out), "--explain"], capsys)
    assert status == 0 and digest(source) == before
    report = json.loads((tmp_path / "small.onnx.report.json").read_text())
    assert report["channels_removed"] == 3 and report["file_bytes_after"] == out.stat().st_size
    assert report["parameters_after"] < report["parameters_before"] and report["source"] == source
    assert report["flops_before"] > report["flops_after"] > 0 and report["sample_shapes"] == {"x": [2, 3, 8, 8]}
    assert report["latency"]["before_ms"] > 0 and report["latency"]["rounds"] >= 4  # the CLI measures latency
    assert "| FLOPs |" in (tmp_path / "small.onnx.report.md").read_text()
    status, _ = run_cli(["strip", source, "--no-latency"], capsys)  # default: beside the input
    assert status == 0 and (tmp_path / "cnn.stripped.onnx").is_file()
    assert json.loads((tmp_path / "cnn.stripped.onnx.report.json").read_text())["latency"] is None
    for args, needle in ((["strip", str(tmp_path / "missing.onnx")], "missing.onnx"),
                         (["strip", source, "--model", "timm:resnet18"], "--model"),
                         (["strip", "--out", str(out)], "--out")):
        status, err = run_cli(args, capsys)
        assert_clean_failure(status, err, needle)


# -- split, slice, gather; normalisation; resize; transposed convolutions; QDQ; computed shapes ----

def stripped_both_ways(model: nn.Module, x: torch.Tensor, tmp_path, dynamo: bool, name: str):
    """(summary, stripped file) of the model's export, checked to leave the input file as it was."""
    source = export(model, x, tmp_path / f"{name}.onnx", dynamo)
    before = digest(source)
    summary = strip_onnx(source, tmp_path / f"{name}.small.onnx", latency=False)
    assert digest(source) == before
    assert summary.max_relative_error <= 1e-5
    return summary, tmp_path / f"{name}.small.onnx"


def weight_shapes(stripped: nn.Module, names: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in stripped.named_parameters() if name in names}


class Pieces(nn.Module):
    """Channels cut into pieces: ``torch.split`` (constant sizes), ``torch.chunk`` (equal pieces,
    which the TorchScript exporter computes from ``Shape``), slices, a channel list
    (``index_select``: Gather with a 1-d constant) and one gathered channel (Gather, scalar)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(20, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        p, q = torch.split(h, [3, 5], 1)
        u, v = torch.chunk(F.relu(self.b(x)), 2, dim=1)
        picked = torch.index_select(h, 1, torch.tensor([7, 2, 4]))
        return self.c(torch.cat([p, q[:, 1:], h[:, 2:6], u, v, picked], 1)) + h[:, 3].unsqueeze(1)


@pytest.mark.parametrize("dynamo", [False, True])
def test_split_chunk_slice_and_gather_rewrite_their_constants(tmp_path, dynamo):
    """a's zero channels 1, 4, 6 fall inside split pieces, slices and the channel list; b's 1 and 5
    inside the two chunks: all five go, every split size, slice bound and index is rewritten. The
    gathered channel 3 stays (moved to index 2). ``ctk.strip`` on the PyTorch model removes b's
    two only: ATen's ``index_select`` has no rule there."""
    model = Pieces().eval()
    with torch.no_grad():
        for conv, channels in ((model.a, [1, 4, 6]), (model.b, [1, 5])):
            conv.weight[channels] = 0
            conv.bias[channels] = 0
    x = torch.randn(2, 3, 5, 5)
    summary, small = stripped_both_ways(model, x, tmp_path, dynamo, "pieces")
    assert summary.channels_removed == 5
    shapes = initializer_shapes(small)
    assert (shapes["a.weight"], shapes["b.weight"], shapes["c.weight"]) == ((5, 3, 1, 1), (4, 3, 1, 1), (4, 13, 1, 1))
    reference = weight_shapes(ctk.strip(model, (x,)), ("a.weight", "b.weight", "c.weight"))
    assert reference == {"a.weight": (8, 3, 1, 1), "b.weight": (4, 3, 1, 1), "c.weight": (4, 18, 1, 1)}


def test_a_strided_slice_and_a_gathered_zero_channel_are_kept(tmp_path):
    """Positive controls: a strided slice over channels pins them (removing one would shift the
    stride; a's zero channel 2 and the unread odd ones stay), and a zero channel read by a scalar
    Gather has no dim to be removed from (b's channel 1 stays; the three it leaves unread go, and
    the index becomes 0)."""

    class Strided(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1)
            with torch.no_grad():
                self.a.weight[2], self.a.bias[2], self.b.weight[1], self.b.bias[1] = 0, 0, 0, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.a(x)[:, ::2]) + self.b(x)[:, 1].unsqueeze(1)

    summary, small = stripped_both_ways(Strided(), torch.randn(2, 3, 4, 4), tmp_path, False, "strided")
    assert summary.channels_removed == 3
    shapes = initializer_shapes(small)
    assert (shapes["a.weight"], shapes["b.weight"]) == ((6, 3, 1, 1), (1, 3, 1, 1))
    assert any(b.startswith("strided slice Slice") for b in summary.barriers)
    assert any(b.startswith("gathered by Gather") for b in summary.barriers)


class TransformerBlock(nn.Module):
    """Pre-norm attention (two heads) and MLP, with their residual adds."""

    def __init__(self, dim: int = 16, heads: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


@pytest.mark.parametrize("dynamo, opset", [(False, 17), (False, 14), (True, 18)])
def test_transformer_block_loses_its_zero_and_dead_mlp_neurons(tmp_path, dynamo, opset):
    """Four zero neurons of fc1 and one fc2 ignores go, as ``ctk.strip`` removes them; the heads
    (none zero) stay: attention's batched MatMuls are analysed, not barriers (heads are stripped in
    ``test_onnx_strip_attention.py``). Opset 14 writes LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div,
    and both TorchScript exports compute the reshape targets from ``Shape`` (dynamic batch)."""
    torch.manual_seed(0)
    model = TransformerBlock().eval()
    with torch.no_grad():
        model.fc1.weight[[3, 10, 17, 30]] = 0
        model.fc1.bias[[3, 10, 17, 30]] = 0
        model.fc2.weight[:, 5] = 0
    x = torch.randn(2, 6, 16)
    if opset == 14:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(tmp_path / "block.onnx"), dynamo=False, opset_version=14,
                              do_constant_folding=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
        assert "LayerNormalization" not in {n.op_type for n in onnx.load(str(tmp_path / "block.onnx")).graph.node}
        summary = strip_onnx(tmp_path / "block.onnx", tmp_path / "block.small.onnx", latency=False)
        assert summary.max_relative_error <= 1e-5
    else:
        summary, _ = stripped_both_ways(model, x, tmp_path, dynamo, "block")
    assert summary.channels_removed == 5
    assert summary.parameters_before - summary.parameters_after == 5 * (16 + 1 + 16)
    assert not any(b.startswith("MatMul at node") for b in summary.barriers)
    reference = weight_shapes(ctk.strip(model, (x,)), ("fc1.weight", "fc2.weight"))
    assert reference == {"fc1.weight": (27, 16), "fc2.weight": (16, 27)}


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of ``[N, C, H, W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("act, op", [(nn.Softmax(dim=1), "Softmax"), (nn.LogSoftmax(dim=1), "LogSoftmax"),
                                     (ChannelLayerNorm(4), "LayerNormalization")])
def test_normalising_over_channels_keeps_them(tmp_path, act, op):
    """Positive controls: a zero channel normalised together with the others stays."""
    summary = strip_block(tmp_path, Block(act))
    assert summary.channels_removed == 0
    assert any(b.startswith(f"normalised dim of {op}") for b in summary.barriers)


class Decoder(nn.Module):
    """Strided convs down, ``ConvTranspose`` up (stride 2, then stride 1), bilinear ``Resize``."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.up1, self.bn = nn.ConvTranspose2d(32, 16, 2, stride=2), nn.BatchNorm2d(16)
        self.up2, self.head = nn.ConvTranspose2d(16, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.up1(self.enc(x))))
        return self.head(F.interpolate(F.relu(self.up2(h)), scale_factor=2.0, mode="bilinear"))


@pytest.mark.parametrize("dynamo", [False, True])
def test_pruned_decoder_strips_like_ctk_strip(tmp_path, dynamo):
    """Half the channel groups zeroed by ``ctk.prune``: every conv and transposed conv keeps the
    channels ``ctk.strip`` keeps on the PyTorch model (the weight of ``ConvTranspose`` is
    ``[in, out, ...]``); the Resize passes channels through."""
    torch.manual_seed(0)
    model, x = Decoder().eval(), torch.randn(1, 3, 16, 16)
    ctk.prune(model, (x,), 0.5, "channel")
    summary, small = stripped_both_ways(model, x, tmp_path, dynamo, "decoder")
    assert summary.channels_removed == 32
    names = ("enc.0.weight", "enc.3.weight", "up1.weight", "up2.weight", "head.weight")
    expected = weight_shapes(ctk.strip(model, (x,)), names)
    assert expected["up1.weight"] == (16, 8, 2, 2)
    shapes = initializer_shapes(small)
    assert {name: shapes[name] for name in names} == expected


def test_depthwise_conv_transpose_loses_groups_and_resizing_channels_pins_them(tmp_path):
    """A depthwise ConvTranspose (2 outputs per group) loses the groups of zero input channels 1
    and 3; a Resize that scales the channel dim pins them (positive control)."""
    a, up = weights(4, 3, 1, 1), weights(4, 2, 3, 3)
    a[[1, 3]] = 0
    bias = weights(8)
    bias[[2, 3, 6, 7]] = 0
    nodes = [node("Conv", ["x", "a"], "h"), node("Relu", ["h"], "r"),
             node("ConvTranspose", ["r", "up", "upb"], "t", group=4, strides=[2, 2]), node("Conv", ["t", "c"], "y")]
    model = hand_model(nodes, {"x": ["batch", 3, 4, 4]}, {"a": a, "up": up, "upb": bias, "c": weights(2, 8, 1, 1)})
    summary = strip_onnx(model, tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == 2 and summary.max_relative_error <= 1e-5
    assert initializer_shapes(tmp_path / "small.onnx") == {"a": (2, 3, 1, 1), "up": (2, 2, 3, 3), "upb": (4,),
                                                            "c": (2, 4, 1, 1)}
    transposed = next(n for n in onnx.load(str(tmp_path / "small.onnx")).graph.node if n.op_type == "ConvTranspose")
    assert next(a.i for a in transposed.attribute if a.name == "group") == 2
    scales = np.array([1, 2, 1, 1], dtype=np.float32)
    nodes = [node("Conv", ["x", "a"], "h"), node("Resize", ["h", "", "scales"], "z", mode="nearest"),
             node("ReduceSum", ["z"], "y", keepdims=0)]
    model = hand_model(nodes, {"x": [2, 3, 4, 4]}, {"a": a, "scales": scales})
    summary = strip_onnx(model, tmp_path / "resized.onnx", latency=False)
    assert summary.channels_removed == 0
    assert any(b.startswith("resized by Resize") for b in summary.barriers)


class Calibration:
    """A few seeded batches for ONNX Runtime's static quantizer."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        rng = np.random.default_rng(0)
        self.batches = iter([{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(4)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def test_qdq_int8_file_of_a_pruned_cnn_strips_exactly(tmp_path):
    """``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations with nonzero zero
    points) on the exported pruned CNN: the int8 weights lose the rows and columns of the channels
    the float file loses, with their scales and zero points, and the stripped file's outputs equal
    the unstripped QDQ file's."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    reader = type("Reader", (Calibration, CalibrationDataReader), {})((2, 3, 8, 8))
    torch.manual_seed(0)
    model, x = ResidualCNN().eval(), torch.randn(2, 3, 8, 8)
    ctk.prune(model, (x,), 0.5, "channel")
    source = export(model, x, tmp_path / "cnn.onnx", dynamo=False)
    qdq = str(tmp_path / "cnn.qdq.onnx")
    quantize_static(source, qdq, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    before = digest(qdq)
    summary = strip_onnx(qdq, tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == strip_onnx(source, tmp_path / "float.onnx", latency=False).channels_removed == 12
    assert summary.max_relative_error == 0.0 and digest(qdq) == before
    shapes = initializer_shapes(tmp_path / "small.onnx")
    assert shapes["conv4.weight_quantized"] == (8, 4, 3, 3) and shapes["fc.weight_quantized"] == (10, 8)
    assert shapes["conv4.weight_scale"] == shapes["conv4.weight_zero_point"] == (8,)
    feed = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    outputs = [onnxruntime.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, feed)[0]
               for p in (qdq, str(tmp_path / "small.onnx"))]
    assert np.array_equal(*outputs)


@pytest.mark.parametrize("read_back, removable", [(10, True), (11, False)])
def test_a_quantized_zero_stays_zero_only_if_the_zero_points_agree(tmp_path, read_back, removable):
    """QuantizeLinear maps a zero channel to its zero point 10; DequantizeLinear maps it back to 0
    only with the same zero point (with 11 it reads -scale: a positive control)."""
    from onnx import TensorProto, helper, numpy_helper

    a, b = weights(4, 3, 1, 1), weights(2, 4, 1, 1)
    a[1] = 0
    constants = {"a": a, "b": b, "s": np.array(0.05, dtype=np.float32)}
    initializers = [numpy_helper.from_array(v, k) for k, v in constants.items()]
    initializers += [numpy_helper.from_array(np.array(z, dtype=np.uint8), name) for name, z in (("zq", 10),
                                                                                              ("zd", read_back))]
    nodes = [node("Conv", ["x", "a"], "h"), node("QuantizeLinear", ["h", "s", "zq"], "q"),
             node("DequantizeLinear", ["q", "s", "zd"], "d"), node("Conv", ["d", "b"], "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    summary = strip_onnx(model, tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == int(removable) and summary.max_relative_error <= 1e-5


class Viewed(nn.Module):
    """``x.view(x.size(0), -1)`` and a second reshape of the conv's output: with a dynamic batch
    the TorchScript exporter computes both targets from ``Shape`` -> ``Gather`` -> ``Concat``.
    ``rows``: ``(b, c, h * w)`` keeps the channel dim, ``(b, c * h, w)`` merges it into the rows,
    and ``other`` reads the channel count from another conv's output, which loses no channel.
    Channel 1 of ``a`` is zero."""

    def __init__(self, rows: str = "keep") -> None:
        super().__init__()
        self.rows = rows
        self.a, self.other, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Linear(4 * 16, 2)
        with torch.no_grad():
            self.a.weight[1], self.a.bias[1] = 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, z = self.a(x), self.other(x)
        b, c, h, w = y.shape
        if self.rows == "keep":
            rows = y.reshape(b, c, h * w)
        elif self.rows == "merge":
            rows = y.reshape(b, c * h, w)
        else:
            rows = y.reshape(b, z.size(1), h * w)
        return self.fc(y.view(y.size(0), -1)) + rows.sum((1, 2)).unsqueeze(1) + z.sum((1, 2, 3)).unsqueeze(1)


def reshape_targets(path) -> list[list[int] | None]:
    """Each ``Reshape``'s target in the file, where it is an initializer (``None``: computed)."""
    graph = onnx.load(str(path)).graph
    constants = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in graph.initializer}
    return [constants.get(n.input[1]) for n in graph.node if n.op_type == "Reshape"]


@pytest.mark.parametrize("rows, written", [("keep", 0), ("merge", 0), ("other", 1)])
def test_reshape_targets_computed_from_shape_are_followed_or_written_as_constants(tmp_path, rows, written):
    """A computed target entry that is the batch, ``-1``, the size of the dim it keeps or the
    channel count times the rows it merges into follows the strip by itself (run again on the
    kept sizes, it is the new size): the target stays computed. One read from a tensor that
    keeps its channels does not, so that target is written as a constant, the batch as a ``0``
    that copies the input's (shape inference names both dims alike). Each way the channel goes,
    and the file runs in ONNX Runtime at another batch as the model does."""
    import onnxruntime

    model = Viewed(rows).eval()
    summary, small = stripped_both_ways(model, torch.randn(2, 3, 4, 4), tmp_path, False, "viewed")
    assert summary.channels_removed == 1 and initializer_shapes(small)["a.weight"][0] == 3
    constant = [t for t in reshape_targets(small) if t is not None]
    assert constant == [[0, 3, 16]] * written, constant
    other = torch.randn(5, 3, 4, 4)
    [out] = onnxruntime.InferenceSession(str(small), providers=["CPUExecutionProvider"]).run(None, {"x": other.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(other).numpy(), rtol=1e-5, atol=1e-5)


class Swapped(nn.Module):
    """``y.reshape(b, z.size(1), w, h)`` with the batch, height and width dynamic: the channel
    count read from another conv's output, which loses no channel, and two entries read from
    symbolic sizes at positions where the input has other dims."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.other, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Linear(4, 2)
        with torch.no_grad():
            self.a.weight[1], self.a.bias[1] = 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, z = self.a(x), self.other(x)
        b, _, h, w = y.shape
        return self.fc(y.reshape(b, z.size(1), w, h).mean((2, 3))) + z.mean((1, 2, 3)).unsqueeze(1)


def test_a_computed_target_no_constant_can_stand_for_keeps_its_channels(tmp_path):
    """Positive control: the target above can neither follow the strip (its channel entry is read
    from ``other``, which keeps 4) nor be written as a constant (``w`` and ``h`` are not the input's
    dims at their positions, and only one entry may be ``-1``), so the reshape keeps the channel and
    says why; verified in ONNX Runtime."""
    model = Swapped().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 4, 5),), str(tmp_path / "swapped.onnx"), dynamo=False,
                          do_constant_folding=False, input_names=["x"], dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    summary = strip_onnx(tmp_path / "swapped.onnx", tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == 0 and summary.max_relative_error <= 1e-5
    assert initializer_shapes(tmp_path / "small.onnx")["a.weight"][0] == 4
    assert any(b.startswith("target of Reshape") and "entry 1 would be 4 after the strip, not 3" in b
               for b in summary.barriers), summary.barriers


def test_qdq_weights_shared_by_unrelated_layers_are_cut_per_reader(tmp_path):
    """Fresh BatchNorms share one all-ones scale and one all-zeros shift in the TorchScript export;
    the quantizer dequantizes each shared initializer once. Each layer still loses its own pruned
    channels (one copy of the DequantizeLinear per reader), exactly; copies that keep the same
    channels are merged back."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    torch.manual_seed(0)
    model = nn.Sequential(*(m for c_in in (3, 8, 8) for m in (nn.Conv2d(c_in, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                               nn.ReLU())), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    ctk.prune(model, (x,), 0.5, "channel")
    source = export(model, x, tmp_path / "cnn.onnx", dynamo=False)
    qdq = str(tmp_path / "cnn.qdq.onnx")
    quantize_static(source, qdq, type("Reader", (Calibration, CalibrationDataReader), {})((2, 3, 8, 8)),
                    quant_format=QuantFormat.QDQ, per_channel=True)
    readers = [n for n in onnx.load(qdq).graph.node if n.op_type == "Identity"]
    assert len({n.input[0] for n in readers}) < len(readers)  # one dequantized scale read by several layers
    summary = strip_onnx(qdq, tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == strip_onnx(source, tmp_path / "float.onnx", latency=False).channels_removed == 12
    assert summary.max_relative_error == 0.0


class Shuffled(nn.Module):
    """Two convs concatenated, torchvision's channel shuffle (``view`` to ``[B, 2, C/2, H, W]``,
    ``transpose``, ``view`` back, the sizes read from ``x.size()``: with a dynamic batch the
    TorchScript exporter computes both targets from ``Shape``), then two convs. ``zeros``: the
    channels of ``a`` and of ``b`` that are zero; channel 2 of ``c`` is zero too."""

    def __init__(self, zeros: tuple[list[int], list[int]]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c, self.d = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 6, 1), nn.Conv2d(6, 3, 1)
        with torch.no_grad():
            for conv, channels in ((self.a, zeros[0]), (self.b, zeros[1]), (self.c, [2])):
                conv.weight[channels], conv.bias[channels] = 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.models.shufflenetv2 import channel_shuffle

        y = channel_shuffle(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1), 2)
        return self.d(F.relu(self.c(y)))


@pytest.mark.parametrize("zeros, removed", [(([1], [1]), 2), (([1, 3], [3, 1]), 3), (([1], [2]), 1)])
def test_a_channel_shuffle_loses_a_position_of_every_group_like_ctk_strip(tmp_path, zeros, removed):
    """The shuffle's split puts the channels on its second dim, each position joined across the
    groups, so a position zero in every group goes (twice: one channel of ``a`` and one of
    ``b``), and the targets computed from ``Shape`` give the kept sizes by themselves. A position
    zero in one group only is kept in all (positive control: ``([1], [2])`` removes only ``c``'s
    channel). The numbers are ``ctk.strip``'s, and the stripped file runs in ONNX Runtime at
    another batch size as the model does."""
    import onnxruntime

    model = Shuffled(zeros).eval()
    x = torch.randn(2, 3, 4, 4)
    summary, small = stripped_both_ways(model, x, tmp_path, False, "shuffled")
    assert summary.channels_removed == removed
    shapes, stripped = initializer_shapes(small), ctk.strip(copy.deepcopy(model), (x,))
    assert {name: shapes[name] for name in ("a.weight", "b.weight", "c.weight")} == \
        weight_shapes(stripped, ("a.weight", "b.weight", "c.weight"))
    assert summary.parameters_after == sum(p.numel() for p in stripped.parameters())
    kept = 4 - (removed - 1)  # positions removed from each group: all but c's channel
    assert shapes["a.weight"][0] == shapes["b.weight"][0] == kept and shapes["c.weight"] == (5, 2 * kept, 1, 1)
    other = torch.randn(5, 3, 4, 4)
    session = onnxruntime.InferenceSession(str(small), providers=["CPUExecutionProvider"])
    [out] = session.run(None, {"x": other.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(other).numpy(), rtol=1e-5, atol=1e-5)
