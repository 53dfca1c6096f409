"""Smoke run of tools/bench_onnx_strip.py (``--quick``: ResNet-18 at 64 x 64, 2 rounds) as a user
runs it: the parameter columns it prints are the ones it claims, this strip removes at least as
many parameters as onnxsim's structured pruning and matches ``ctk.strip`` on the PyTorch model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_onnx_strip.py"


def folded_parameter_count(model: nn.Module) -> int:
    """Parameters of the model's ONNX file with BN folded: each BN's scale and shift become one bias
    per channel of the convolution before it."""
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    in_bn = sum(p.numel() for m in batch_norms for p in m.parameters())
    return sum(p.numel() for p in model.parameters()) - in_bn + sum(m.num_features for m in batch_norms)


def test_quick_bench_table(tmp_path):
    pytest.importorskip("onnxsim", reason="onnxsim 0.8.1 is not in this environment")
    import torchvision

    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(TOOL), "--quick", "--json", str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "250"})
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = json.loads(out.read_text())["rows"]
    params = row["params"]
    # Positive control for the counting: the exported file holds resnet18's parameters with BN folded.
    assert params["original"] == folded_parameter_count(torchvision.models.resnet18()) == 11_684_712
    assert params["ctk"] <= params["onnxsim"] < params["original"]
    assert abs(params["ctk"] - params["ctk_strip_pytorch"]) <= 0.01 * params["ctk_strip_pytorch"]
    assert params["original"] > 3.5 * params["ctk"]  # half the channels of every group: about a quarter left
    errors = row["max_relative_error"]
    assert errors["ctk"] <= 1e-5
    assert isinstance(errors["onnxsim"], float) and errors["onnxsim"] <= 1e-5  # it removed the zero-norm channels
    assert errors["ctk_export"] <= 1e-5  # the file `ctk export` writes for the same pruned model, timed beside
    assert set(row["speedup"]) == {"ctk", "onnxsim", "ctk_export"} and all(v > 0 for v in row["speedup"].values())
    table_row = next(line for line in done.stdout.splitlines() if "resnet18" in line)
    cells = [cell.strip() for cell in table_row.strip("│ ").split("│")]
    assert cells[:5] == ["resnet18", *(f"{params[k]:,}" for k in ("original", "ctk", "onnxsim", "ctk_strip_pytorch"))]
