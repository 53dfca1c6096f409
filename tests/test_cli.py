"""The main job end to end in a subprocess, and every bad input's one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compile_toolkit.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def main_job(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("job") / "digits"
    result = subprocess.run(
        [sys.executable, "-m", "compile_toolkit", "export", "--pruned", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "160"},
    )
    return out, result


def test_main_job_writes_sane_report(main_job):
    out, result = main_job
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    dense, stripped = report["dense"], report["stripped"]
    assert report["model"] == "digits-resnet" and report["sparsity"] == 0.5
    assert stripped["params"] < 0.4 * dense["params"]
    assert stripped["flops"] < 0.4 * dense["flops"]
    assert dense["accuracy"] > 0.97
    assert stripped["accuracy"] > dense["accuracy"] - 0.03
    assert stripped["accuracy"] == pytest.approx(report["pruning"]["accuracy"], abs=1 / 450)
    assert dense["latency_ms"] > 0 and stripped["latency_ms"] > 0
    formats = {a["format"]: a for a in report["artifacts"]}
    assert set(formats) == {"torchscript", "pt2", "onnx", "stablehlo"}
    for artifact in formats.values():
        assert (out / artifact["path"]).exists()
        assert artifact["max_abs_error"] < 1e-3
    assert "report.md" in os.listdir(out) and "| parameters |" in (out / "report.md").read_text()
    assert "test accuracy" in result.stdout
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_main_job_captures_each_model_state_once(main_job):
    """Prune and strip share one capture of the model (fine-tuning changes its weights in place,
    which the program shares); the stripped graph and its static-batch twin for XLA are lifted
    from the strip's rewrite of that program, not traced again; the only other capture is the
    dense copy exported for comparison. Each is counted with its reason, and the report says so."""
    out, result = main_job
    assert result.returncode == 0, result.stderr[-2000:]
    pipeline = json.loads((out / "report.json").read_text())["pipeline"]
    assert pipeline["capture_reasons"] == ["DigitsResNet", "DigitsResNet"]  # the model, and its dense copy
    assert pipeline["programs_lifted"] == ["the stripped graph", "GraphModule at a static batch (XLA)"]
    assert pipeline["captures"] == 2 and pipeline["captures_reused"] == 2
    assert pipeline["analyses"] == 2  # prune's and strip's: the weights changed in between
    assert pipeline["analysis_reasons"] == ["coupled groups of DigitsResNet with its weights now (pruning)",
                                            "strip: zero and dead channels"]
    assert [stage["name"] for stage in pipeline["stages"]][:3] == ["load model", "measure dense model",
                                                                   "prune 50% of channels (l1, coupled groups)"]
    assert "2 captures with torch.export" in (out / "report.md").read_text()


def test_a_capture_is_reused_until_the_module_changes():
    """Positive and negative controls of the capture memo: the same state is served again (and
    in-place weight changes are seen through it); a replaced parameter, a changed flag or other
    input shapes capture again, each with its reason."""
    from torch import nn

    from compile_toolkit.capture import capture
    from compile_toolkit.pipeline import recording

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    with recording() as log:
        first = capture(model, (x,))
        with torch.no_grad():
            model[0].weight.mul_(2)  # in place: the program shares the tensor
        assert capture(model, (x,)).program is first.program
        torch.testing.assert_close(first.program.module()(x), model(x))
        model[0].weight = nn.Parameter(model[0].weight.detach().clone())
        capture(model, (x,))
        model[1].inplace = True
        capture(model, (x,))
        capture(model, (torch.randn(2, 3, 9, 9),))
    assert log.reused == 1 and log.captures == [
        "Sequential", "Sequential again: parameters or buffers replaced", "Sequential again: attributes changed",
        "Sequential again: other input shapes"]


def test_stripped_onnx_has_exactly_the_dense_graphs_ops(main_job):
    """No gathers, slices or reshapes left over from the rewrite: just smaller tensors."""
    import collections

    import onnx

    out, result = main_job
    assert result.returncode == 0
    ops = [collections.Counter(n.op_type for n in onnx.load(str(p)).graph.node) for p in (out / "dense" / "model.onnx", out / "model.onnx")]
    assert ops[0] == ops[1]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    status = main(args)
    return status, capsys.readouterr().err


def assert_clean_failure(status: int, err: str, *needles: str) -> None:
    assert status != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("ctk: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--model", "no-such-model"], ["no-such-model"]),
        (["--model", "torchvision:resnet_9000"], ["resnet_9000"]),
        (["--sparsity", "1.0"], ["sparsity", "1.0"]),
        (["--sparsity", "-0.1"], ["sparsity"]),
        (["--input-shape", "1,3,32,32"], ["1, 3, 32, 32"]),
        (["--input-shape", "one,two"], ["one,two"]),
        (["--formats", "onnx,tflite"], ["tflite"]),
        (["--lr", "inf"], ["--lr", "inf"]),  # issue 20.21: failed after fine-tuning
        (["--lr", "nan"], ["--lr", "nan"]),
        (["--finetune-epochs", "99999999999999999999"], ["--finetune-epochs", "1000"]),  # 20.7: ran for ever
        (["--batch-size", "99999999999"], ["--batch-size", str(2**20)]),
    ],
)
def test_bad_options_fail_cleanly(tmp_path, capsys, args, needles):
    out = tmp_path / "out"
    status, err = run_cli(["export", "--pruned", "--out", str(out), *args], capsys)
    assert_clean_failure(status, err, *needles)
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_weights_fail_cleanly(tmp_path, capsys):
    out = tmp_path / "out"
    status, err = run_cli(["export", "--out", str(out), "--weights", str(tmp_path / "nope.safetensors")], capsys)
    assert_clean_failure(status, err, "nope.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not a safetensors file")
    status, err = run_cli(["export", "--out", str(out), "--weights", str(corrupt)], capsys)
    assert_clean_failure(status, err, "corrupt.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.safetensors"]


def test_unwritable_output_folder_fails_cleanly(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    status, err = run_cli(["export", "--out", str(blocker / "out")], capsys)
    assert_clean_failure(status, err, str(blocker / "out"))
    status, err = run_cli(["export", "--out", str(blocker)], capsys)
    assert_clean_failure(status, err, str(blocker))
    assert blocker.read_text() == "a file where a folder should be"


def test_console_script_reports_errors_with_exit_status():
    ctk = Path(sys.executable).parent / "ctk"
    result = subprocess.run([str(ctk), "export", "--sparsity", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "ctk: error: --sparsity must be in [0, 1), got 2.0"


BARRIER_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=1))


def build():
    net = Net()
    with torch.no_grad():
        net.a.weight[2] = 0
        net.a.bias[2] = 0
    return net
'''


def test_strip_explain_names_the_op_and_node_that_kept_a_group(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    source = tmp_path / "net.py"
    source.write_text(BARRIER_MODEL)
    status = main(["strip", "--explain", "--model", f"{source}:build", "--input-shape", "2,3,4,4"])
    out = capsys.readouterr().out
    assert status == 0
    assert ": 0 channels removed" in out
    assert "no channel rule for aten.cumsum at node cumsum" in out


def test_strip_reports_channels_and_parameters_removed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    source = tmp_path / "net.py"
    source.write_text(BARRIER_MODEL.replace("torch.cumsum(self.a(x), dim=1)", "torch.relu(self.a(x))"))
    assert main(["strip", "--model", f"{source}:build", "--input-shape", "2,3,4,4"]) == 0
    # a: 3->6 conv (24 parameters), b: 6->4 (28); channel 2 of a goes: 20 + 24 parameters stay.
    assert "net.py:build: 1 channels removed (counting each coupled channel once), parameters 52 -> 44 (1.18x fewer)" in (
        capsys.readouterr().out
    )


def test_pruned_without_fine_tuning_reestimates_batch_norm(tmp_path, capsys):
    """Pruned and not fine-tuned, the batch norms would keep the dense network's statistics (15% test
    accuracy at 50% here); re-estimated on the training split (no weight changes): 54%."""
    status = main(["export", "--pruned", "--no-finetune", "--formats", "onnx", "--out", str(tmp_path)])
    assert status == 0
    pruning = json.loads((tmp_path / "report.json").read_text())["pruning"]
    assert pruning["batchnorm_recalibrated"] == 8 and "finetune_losses" not in pruning
    assert pruning["accuracy_before_finetune"] < 0.3 and pruning["accuracy"] > 0.45
    assert "re-estimate batch-norm statistics" in capsys.readouterr().err


def test_every_option_is_declared_once_on_its_job():
    """The parser is built from the jobs' fields: parsing no option gives the dataclass defaults,
    and each option reaches its field (a negated switch included)."""
    import dataclasses

    from compile_toolkit.cli import _parser
    from compile_toolkit.export_job import ExportJob
    from compile_toolkit.options import from_args
    from compile_toolkit.prune_job import PruneJob

    parser = _parser()
    assert from_args(ExportJob, parser.parse_args(["export"])) == ExportJob()
    assert from_args(PruneJob, parser.parse_args(["prune"])) == PruneJob()
    job = from_args(ExportJob, parser.parse_args(["export", "--no-finetune", "--formats", "onnx, pt2", "--sparsity",
                                                  "0.3", "--structure", "neuron", "--batch-size", "8"]))
    assert (job.finetune, job.formats, job.prune.sparsity, job.prune.structure, job.batch_size) == (
        False, ("onnx", "pt2"), 0.3, "neuron", 8)
    flags = {action.dest for action in parser._subparsers._group_actions[0].choices["export"]._actions}
    fields = {f.name for f in dataclasses.fields(ExportJob)} - {"prune", "latency_rounds"}
    assert fields <= flags  # every option of the job is on the command line


def test_the_report_is_typed_and_report_json_is_its_view(tmp_path):
    """ExportReport is filled stage by stage; to_dict leaves out what no stage filled and spells
    the latency section as report.json always has."""
    from compile_toolkit.report import ExportReport, Latency, ModelMeasure

    report = ExportReport("m", 0.0, [], ModelMeasure(10, 20, None))
    assert report.to_dict() == {"model": "m", "sparsity": 0.0, "notes": [], "artifacts": [],
                                "dense": {"params": 10, "flops": 20, "accuracy": None, "latency_ms": None,
                                          "artifacts": []}}
    report.stripped, report.latency = ModelMeasure(5, 8, None, 1.0), Latency("ort", 2.0, 12)
    report.strip = {"channels_removed": 3, "groups": [], "barriers": [], "max_relative_error": 0.0}
    found = report.to_dict()
    assert (found["speedup"], found["latency_runtime"], found["latency_rounds"]) == (2.0, "ort", 12)
    assert "pruning" not in found and "skipped" not in found and "latency" not in found
