"""compile_toolkit.exporters: every format written, loaded in its own runtime and compared.

Each heavy export runs once inside one test (not a shared fixture) so that ``pytest -n 2`` never
repeats it on both workers; the StableHLO worker subprocess runs its XLA work in two tests.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn
from torch.export import Dim

from compile_toolkit.errors import CtkError, VerificationError
from compile_toolkit.exporters import FORMATS, Artifact, export, torchscript
from compile_toolkit.exporters.checks import build_checks
from compile_toolkit.exporters.stablehlo import StableHLOWorker
from compile_toolkit.exporters.staging import staged
from compile_toolkit.exporters.tensor_files import save_tensor_sets

TOL = 1e-4


class SmallNet(nn.Module):
    """conv + BN + ReLU + pool + linear, BN with non-trivial statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


class ViewNet(nn.Module):
    """Reads the batch size in Python (``x.size(0)``), which a naive trace bakes in."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(x.size(0), -1)) + torch.zeros(x.shape[0], 3)


def make_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return SmallNet().eval(), torch.randn(5, 3, 8, 8)


def run_artifact(artifact: Artifact, x: torch.Tensor) -> torch.Tensor:
    """Load the artifact in its runtime, independently of the exporter's own verification."""
    if artifact.format == "torchscript":
        return torch.jit.load(artifact.path)(x)
    if artifact.format == "pt2":
        return torch.export.load(artifact.path).module()(x)
    session = onnxruntime.InferenceSession(artifact.path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def check_all_formats(artifacts: list[Artifact], out_dir: str, reference: nn.Module,
                      x: torch.Tensor) -> None:
    """Every format present, verified, reloadable at batch 1 and 5, the ONNX file self-contained."""
    assert [a.format for a in artifacts] == list(FORMATS)
    assert sorted(os.listdir(out_dir)) == ["model.onnx", "model.pt", "model.pt2", "stablehlo"]
    with torch.no_grad():
        for artifact in artifacts:
            assert os.path.exists(artifact.path) and artifact.size_bytes > 1000
            assert 0.0 <= artifact.max_abs_error < TOL, artifact
            if artifact.format == "stablehlo":
                assert artifact.static_batch == 5
                assert artifact.runtime.startswith("torch_xla")
                continue
            assert artifact.static_batch is None
            for batch in (x[:1], x):
                error = (run_artifact(artifact, batch) - reference(batch)).abs().max().item()
                assert error < TOL, (artifact.format, batch.shape[0], error)
    onnx_artifact = artifacts[FORMATS.index("onnx")]
    model = onnx.load(onnx_artifact.path)
    onnx.checker.check_model(model)
    assert model.opset_import[0].version >= 18
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    session = onnxruntime.InferenceSession(onnx_artifact.path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    recomputed = float(np.abs(out - reference(x).detach().numpy()).max())
    assert recomputed <= onnx_artifact.max_abs_error + 1e-7
    shlo = artifacts[FORMATS.index("stablehlo")].path
    assert {"functions", "data", "model.mlir"} <= set(os.listdir(shlo))
    with open(os.path.join(shlo, "model.mlir")) as text:
        assert "stablehlo.convolution" in text.read()


def test_plain_module_all_formats(tmp_path):
    model, x = make_model()
    artifacts = export(model, (x,), str(tmp_path))
    check_all_formats(artifacts, str(tmp_path), model, x)
    assert Artifact(**artifacts[0].to_dict()) == artifacts[0]


def test_edited_graph_module_all_formats(tmp_path):
    """A GraphModule from torch.export, edited (ReLU output halved) as a pass would edit it."""
    model, x = make_model()
    gm = torch.export.export(model, (x,), dynamic_shapes=({0: Dim.AUTO},)).module()
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    with gm.graph.inserting_after(relu):
        half = gm.graph.call_function(torch.ops.aten.mul.Tensor, (relu, 0.5))
    relu.replace_all_uses_with(half, delete_user_cb=lambda user: user is not half)
    gm.recompile()
    assert (gm(x) - model(x)).abs().max() > 1e-2  # the edit changes what is computed

    artifacts = export(gm, (x,), str(tmp_path))
    check_all_formats(artifacts, str(tmp_path), gm, x)


def test_graph_module_from_static_export_keeps_its_batch(tmp_path):
    """torch.export.export(model, x).module() guards the batch size; its artifacts say so."""
    model, x = make_model()
    gm = torch.export.export(model, (x,)).module()
    artifacts = export(gm, (x,), str(tmp_path), formats=("pt2", "onnx"))
    for artifact in artifacts:
        assert artifact.static_batch == 5 and artifact.max_abs_error < TOL
        error = (run_artifact(artifact, x) - model(x)).abs().max().item()
        assert error < TOL


def test_torchscript_keeps_python_batch_reads_dynamic(tmp_path):
    torch.manual_seed(0)
    model, x = ViewNet().eval(), torch.randn(4, 3, 4)
    (artifact,) = export(model, (x,), str(tmp_path), formats=("torchscript",))
    assert artifact.static_batch is None
    loaded = torch.jit.load(artifact.path)
    for batch in (x[:1], torch.randn(7, 3, 4)):
        assert (loaded(batch) - model(batch)).abs().max() < TOL


def test_batch_one_example_still_gives_a_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model, x = ViewNet().eval(), torch.randn(1, 3, 4)
    for artifact in export(model, x, str(tmp_path), formats=("torchscript", "pt2")):
        assert artifact.static_batch is None
        batch = torch.randn(6, 3, 4)
        assert (run_artifact(artifact, batch) - model(batch)).abs().max() < TOL


class FixedBatchNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(4, -1).sum(1)


def test_model_that_fixes_its_batch_gets_static_artifacts(tmp_path):
    x = torch.randn(4, 3)
    for artifact in export(FixedBatchNet(), (x,), str(tmp_path), formats=("torchscript", "pt2")):
        assert artifact.static_batch == 4 and artifact.max_abs_error == 0.0


def test_baked_trace_is_named_as_such(tmp_path):
    traced = torch.jit.trace(lambda x: x.view(4, -1), (torch.randn(4, 3),))
    path = str(tmp_path / "baked.pt")
    torch.jit.save(traced, path)
    with pytest.raises(VerificationError, match="baked the batch size"):
        torchscript.run(path, [(torch.randn(4, 3),), (torch.randn(1, 3),)])


def test_wrong_reference_raises_and_leaves_nothing(tmp_path):
    model, x = make_model()
    other, _ = make_model()
    with torch.no_grad():
        other.fc.bias += 1.0
    with pytest.raises(VerificationError, match="torchscript: max abs error"):
        export(model, (x,), str(tmp_path), reference=other)
    assert os.listdir(tmp_path) == []  # the StableHLO worker was stopped and its files removed


def test_stablehlo_mismatch_raises_and_leaves_nothing(tmp_path):
    """The parent's side of a finished worker whose outputs are off (no XLA run needed)."""
    model, x = make_model()
    checks = build_checks(model, (x,), None, False, TOL, TOL)
    worker = StableHLOWorker(str(tmp_path))
    try:
        worker.process.kill()
        worker.indices = [0, 1]
        os.mkdir(os.path.join(worker.work, "stablehlo"))
        with open(os.path.join(worker.work, "result.json"), "w") as result:
            json.dump({"runtime": "torch_xla"}, result)
        save_tensor_sets(os.path.join(worker.work, "outputs.safetensors"),
                         [[out[0] + 0.01] for out in checks.expected])
        with pytest.raises(VerificationError, match="stablehlo: max abs error 0.01"):
            worker.result(checks)
    finally:
        worker.close()
    assert os.listdir(tmp_path) == []


def test_dead_stablehlo_worker_is_a_clear_error(tmp_path):
    model, x = make_model()
    checks = build_checks(model, (x,), None, False, TOL, TOL)
    worker = StableHLOWorker(str(tmp_path))
    try:
        worker.process.kill()
        worker.process.wait()
        with pytest.raises(CtkError, match="XLA worker died .*SIGKILL"):
            worker.result(checks)
    finally:
        worker.close()
    assert os.listdir(tmp_path) == []


def test_unknown_format_lists_valid_ones(tmp_path):
    model, x = make_model()
    with pytest.raises(CtkError, match="'tflite'.*valid: torchscript, pt2, onnx, stablehlo"):
        export(model, (x,), str(tmp_path), formats=("onnx", "tflite"))


def test_unwritable_out_dir_is_named(tmp_path):
    model, x = make_model()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = str(blocker / "out")
    with pytest.raises(CtkError, match="a_file/out"):
        export(model, (x,), target)


def test_staged_write_is_all_or_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with staged(str(tmp_path), "thing") as tmp:
            os.mkdir(tmp)
            raise RuntimeError("verification failed")
    assert os.listdir(tmp_path) == []
    for version in ("old", "new"):  # a directory artifact replaces an older one
        with staged(str(tmp_path), "thing") as tmp:
            os.mkdir(tmp)
            (open(os.path.join(tmp, version), "w")).close()
    assert os.listdir(tmp_path) == ["thing"]
    assert os.listdir(tmp_path / "thing") == ["new"]


def test_onnx_weights_over_the_limit_go_beside_the_file(tmp_path, monkeypatch):
    """Over INLINE_LIMIT (2 GiB in use; 0 here, so every weight counts as large) the weights go to
    model.onnx.data, verified in ONNX Runtime; a later small export removes the stale data file,
    and a failed one leaves the published pair as it was."""
    from compile_toolkit.exporters import onnx_format

    model, x = make_model()
    monkeypatch.setattr(onnx_format, "INLINE_LIMIT", 0)
    (artifact,) = export(model, (x,), str(tmp_path), formats=("onnx",))
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    graph, data = (tmp_path / "model.onnx").stat().st_size, (tmp_path / "model.onnx.data").stat().st_size
    assert data > 4 * 8 * 3 * 3 * 3 and artifact.size_bytes == graph + data
    external = [t for t in onnx.load(artifact.path, load_external_data=False).graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {
        "model.onnx.data"}
    with torch.no_grad():
        assert (run_artifact(artifact, x) - model(x)).abs().max().item() < TOL

    other, _ = make_model()
    with torch.no_grad():
        other.fc.bias += 1.0
    with pytest.raises(VerificationError, match="onnx: max abs error"):
        export(other, (x,), str(tmp_path), formats=("onnx",), reference=model)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    with torch.no_grad():
        assert (run_artifact(artifact, x) - model(x)).abs().max().item() < TOL

    monkeypatch.undo()
    (artifact,) = export(model, (x,), str(tmp_path), formats=("onnx",))
    assert os.listdir(tmp_path) == ["model.onnx"]
    assert artifact.size_bytes == (tmp_path / "model.onnx").stat().st_size


@pytest.mark.slow
def test_onnx_export_of_a_model_over_2_gib(tmp_path):
    """A real 2.1 GiB model: protobuf cannot hold it, so its weights go to model.onnx.data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(23_800, 23_800, bias=False)).eval()
    x = torch.randn(2, 23_800)
    (artifact,) = export(model, (x,), str(tmp_path), formats=("onnx",))
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "model.onnx").stat().st_size < 2**20 and artifact.size_bytes > 2**31
    assert artifact.max_abs_error < TOL * max(1.0, model(x).abs().max().item())
