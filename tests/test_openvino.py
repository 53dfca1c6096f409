"""OpenVINO as a verified target: ``openvino/model.xml`` (+ ``model.int8.xml``) converted from the
ONNX files, verified in OpenVINO's CPU runtime with fp32 pinned, ``--runtime openvino`` latency,
and the one-line refusal without the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import assert_clean_failure, run_cli  # tests/ is on sys.path (pytest rootdir)
from test_export import TOL, make_model

from compile_toolkit import openvino_runtime
from compile_toolkit.cli import main
from compile_toolkit.errors import CtkError, VerificationError
from compile_toolkit.exporters import export, openvino_format
from compile_toolkit.models import load_digits_dataset
from compile_toolkit.openvino_runtime import require, run

openvino = require()  # never a plain `import openvino` here: it would start OpenVINO's telemetry
VERSION = openvino.get_version().split("-")[0]  # "2026.4.0"
REAL_RUN, REAL_WRITE = openvino_format.run, openvino_format.write


@pytest.fixture(scope="module")
def digits_job(tmp_path_factory) -> Path:
    """The default digits model, unpruned, through the CLI once: fp32 and int8 IRs, OpenVINO latency."""
    out = tmp_path_factory.mktemp("openvino") / "digits"
    assert main(["export", "--formats", "onnx,openvino", "--runtime", "openvino", "--quantize", "int8",
                 "--out", str(out)]) == 0
    return out


def test_small_cnn_ir_loads_and_matches_the_reference_with_fp32_pinned(tmp_path):
    model, x = make_model()
    artifacts = export(model, x, str(tmp_path), formats=("openvino",))
    assert [a.format for a in artifacts] == ["onnx", "openvino"]  # the IR is converted from model.onnx
    ir = artifacts[1]
    assert ir.path == str(tmp_path / "openvino" / "model.xml") and ir.runtime == f"openvino {VERSION} CPU"
    assert sorted(os.listdir(tmp_path / "openvino")) == ["model.bin", "model.xml"]
    assert 0 <= ir.max_abs_error < TOL and ir.static_batch is None
    weights = 4 * (model.conv.weight.numel() + model.fc.weight.numel())  # the batch norm folds into the conv
    assert os.path.getsize(tmp_path / "openvino" / "model.bin") >= weights  # fp32 weights, not fp16
    core = openvino_runtime.core()
    pinned = core.compile_model(ir.path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    with torch.no_grad():
        for batch in (x[:1], x):  # dynamic batch
            got = pinned.create_infer_request().infer([batch.numpy()])[pinned.outputs[0]]
            assert np.abs(got - model(batch).numpy()).max() < TOL
    if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        # Positive control for the pin: this CPU's default precision is bf16, which the check would fail.
        default = core.compile_model(ir.path, "CPU")
        got = default.create_infer_request().infer([x.numpy()])[default.outputs[0]]
        assert np.abs(got - model(x).detach().numpy()).max() > 10 * TOL


def _perturbed_run(path: str, inputs: list) -> list[list[torch.Tensor]]:
    return [[t + 1e-2 for t in outputs] for outputs in REAL_RUN(path, inputs)]


def _truncated_write(onnx_path: str, xml_path: str) -> None:
    REAL_WRITE(onnx_path, xml_path)
    weights = Path(xml_path).with_suffix(".bin")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.mark.parametrize("broken, message", [("run", "openvino: max abs error"),
                                             ("write", "could not run the artifact")])
def test_a_wrong_ir_fails_verification_and_leaves_no_folder(tmp_path, monkeypatch, broken, message):
    """Positive controls: outputs off by 1e-2 (the runtime patched), and a conversion whose IR lost
    half its weights; either fails the job, and no openvino/ (nor a staging folder) is left."""
    monkeypatch.setattr(openvino_format, broken, {"run": _perturbed_run, "write": _truncated_write}[broken])
    model, x = make_model()
    with pytest.raises(VerificationError, match=message):
        export(model, x, str(tmp_path), formats=("onnx", "openvino"))
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_without_the_package_the_format_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    model, x = make_model()
    with pytest.raises(CtkError, match="optional package 'openvino'"):
        export(model, x, str(tmp_path / "api"), formats=("openvino",))
    assert not (tmp_path / "api").exists()
    status, err = run_cli(["export", "--formats", "openvino", "--out", str(tmp_path / "cli")], capsys)
    assert_clean_failure(status, err, "'openvino'", "pip install openvino")
    assert not (tmp_path / "cli").exists()


def test_openvino_sends_no_telemetry_and_writes_nothing_in_the_home_folder(tmp_path):
    """``import openvino`` alone writes ``~/intel/openvino_ga_cid`` and forks the process to post
    usage data (the positive control); a job that converts, verifies and times an IR does neither.
    (ONNX Runtime keeps a device id under ``~/.cache/Microsoft``; it sends nothing on Linux.)
    OpenVINO's telemetry turns itself off where ``CI``, ``TF_BUILD`` or ``JENKINS_URL`` is set, so
    both runs leave those out: they run as on a user's machine, where the control holds."""
    as_a_user = {name: value for name, value in os.environ.items() if name not in ("CI", "TF_BUILD", "JENKINS_URL")}

    def home_after(code: str, home: Path) -> list[str]:
        home.mkdir()
        run = subprocess.run([sys.executable, "-c", code], env=dict(as_a_user, HOME=str(home)),
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        return sorted(str(p.relative_to(home)) for p in home.rglob("*"))

    assert "intel/openvino_ga_cid" in home_after("import openvino", tmp_path / "plain")
    job = ("from compile_toolkit.cli import main; "
           f"assert main(['export', '--formats', 'openvino', '--runtime', 'openvino', '--out', {str(tmp_path / 'out')!r}]) == 0; "
           "import openvino.tools.ovc.telemetry_utils as t; assert t.tm.__name__.endswith('telemetry_stub'), t.tm")
    assert not [name for name in home_after(job, tmp_path / "job") if name.startswith("intel")]


_TWO_MODELS_THEN_A_CHILD = """
import signal, subprocess, sys
import torch
from compile_toolkit import openvino_runtime
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), sys.argv[1], dynamo=False)
if sys.argv[2] == "shared":
    first, second = openvino_runtime.compile_model(sys.argv[1]), openvino_runtime.compile_model(sys.argv[1])
else:
    first, second = [openvino_runtime.require().Core().compile_model(sys.argv[1], "CPU") for _ in range(2)]
del first   # the first goes first, as when two IRs timed side by side are released
del second
signal.signal(signal.SIGCHLD, lambda *args: None)   # a Python handler: DataLoader workers install one
for _ in range(3):
    subprocess.run(["true"])   # its exit raises SIGCHLD
"""


def test_two_compiled_models_leave_a_signal_stack_that_a_child_can_signal_on(tmp_path):
    """OpenVINO's CPU plugin puts back a freed alternate signal stack when a second Core outlives the
    first; the next Python-handled signal then kills the process (it killed pytest workers here).
    The positive control shows the bug with a Core per model; the toolkit's one Core avoids it."""
    def run_script(how: str) -> int:
        return subprocess.run([sys.executable, "-c", _TWO_MODELS_THEN_A_CHILD, str(tmp_path / "m.onnx"), how],
                              capture_output=True, timeout=300).returncode

    assert run_script("a Core each") == -11  # SIGSEGV
    assert run_script("shared") == 0


def test_runtime_openvino_needs_the_format(tmp_path, capsys):
    status, err = run_cli(["export", "--runtime", "openvino", "--out", str(tmp_path / "out")], capsys)
    assert_clean_failure(status, err, "--runtime openvino", "--formats")
    assert not (tmp_path / "out").exists()


def test_cli_job_writes_verified_fp32_and_int8_irs(digits_job):
    report = json.loads((digits_job / "report.json").read_text())
    artifacts = {a["format"]: a for a in report["artifacts"]}
    assert list(artifacts) == ["onnx", "onnx-int8", "openvino", "openvino-int8"]
    ir, int8 = artifacts["openvino"], artifacts["openvino-int8"]
    assert ir["path"] == "openvino/model.xml" and int8["path"] == "openvino/model.int8.xml"
    assert ir["runtime"] == int8["runtime"] == f"openvino {VERSION} CPU"
    assert ir["max_abs_error"] < 1e-3
    assert sorted(os.listdir(digits_job / "openvino")) == ["model.bin", "model.int8.bin", "model.int8.xml",
                                                           "model.xml"]
    # int8: no float tolerance; every layer runs in int8, as far from float as ONNX Runtime's int8 and as accurate
    details = int8["details"]
    assert details["source"] == "model.int8.onnx" and details["int8_compute_layers"] == details["compute_layers"] > 0
    assert 0 < int8["max_abs_error"] < 2 * artifacts["onnx-int8"]["max_abs_error"]
    assert 0 <= details["max_abs_deviation_from_onnx_int8"] < 2 * artifacts["onnx-int8"]["max_abs_error"]
    data = load_digits_dataset()
    (logits,) = run(str(digits_job / int8["path"]), [(data.x_test,)])[0]
    accuracy = float((logits.argmax(1) == data.y_test).float().mean())
    assert accuracy == pytest.approx(report["quantization"]["models"]["int8_stripped"]["accuracy"], abs=0.01)
    assert {a["format"] for a in report["dense"]["artifacts"]} >= {"onnx", "openvino"}
    assert (digits_job / "dense" / "openvino" / "model.xml").exists()


def test_cli_job_measures_latency_in_openvino(digits_job):
    report = json.loads((digits_job / "report.json").read_text())
    assert report["latency_runtime"] == "openvino"
    assert report["dense"]["latency_ms"] > 0 and report["stripped"]["latency_ms"] > 0
    assert report["speedup"] > 0 and report["latency_rounds"] >= 4
    assert "| OpenVINO latency, batch 1 |" in (digits_job / "report.md").read_text()


def test_cli_job_times_every_model_in_both_runtimes_side_by_side(digits_job):
    """With --formats openvino: dense and stripped, fp32 and int8, in ONNX Runtime and OpenVINO, at
    batch 1 and 8, each a median of alternated-round ratios to dense fp32 in ONNX Runtime."""
    section = json.loads((digits_job / "report.json").read_text())["runtimes"]
    assert section["batches"] == [1, 8] and section["baseline"].startswith("dense fp32 ort")
    models = section["models"]
    assert list(models) == [f"{m} {p} {r}" for m in ("dense", "stripped") for r, p in
                            (("ort", "fp32"), ("ort", "int8"), ("openvino", "fp32"), ("openvino", "int8"))]
    assert models["stripped int8 openvino"]["file"] == "openvino/model.int8.xml"
    assert models["dense fp32 ort"]["file"] == "dense/model.onnx"
    for batch in (1, 8):
        assert models["dense fp32 ort"][f"speedup_batch{batch}"] == 1.0
        assert all(m[f"latency_ms_batch{batch}"] > 0 and m[f"speedup_batch{batch}"] > 0 for m in models.values())
    text = (digits_job / "report.md").read_text()
    assert "## Runtimes" in text and "| stripped | int8 | openvino |" in text
