"""External data: a file whose weights sit in an external data file is read whole, and the strip
writes its output's weights to ``OUT.data`` where they would pass the protobuf's 2 GB
(:data:`~compile_toolkit.onnx_strip.write.INLINE_LIMIT_BYTES`, lowered here instead of writing
gigabytes). The input files are not touched; a strip that fails verification leaves neither
file nor data behind. Positive control: the same strip under the real limit writes one file."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch
from test_onnx_strip import export
from torch import nn

from compile_toolkit.errors import VerificationError
from compile_toolkit.onnx_strip import rewrite, strip_onnx, write


def _source(tmp_path) -> str:
    """An MLP with neuron 7 of its first layer zeroed, its weights in ``mlp.onnx.data``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[0].weight[7] = 0
        model[0].bias[7] = 0
    dense = export(model, torch.randn(3, 16), tmp_path / "dense.onnx", dynamo=False)
    proto = onnx.load(dense)
    (tmp_path / "dense.onnx").unlink()
    path = tmp_path / "mlp.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="mlp.onnx.data", size_threshold=0)
    return str(path)


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _external(path) -> set[str]:
    """Initializers of a file stored as external data."""
    return {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


def test_large_output_is_written_with_external_data(tmp_path, monkeypatch):
    source = _source(tmp_path)
    before = _digests(tmp_path)
    assert _external(source) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    monkeypatch.setattr(write, "INLINE_LIMIT_BYTES", 1000)
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    summary = strip_onnx(source, out, latency=False)
    assert summary.channels_removed == 1 and summary.parameters_after == summary.parameters_before - 16 - 1 - 4
    assert summary.max_relative_error <= 1e-5
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.onnx", "small.onnx.data"]
    assert summary.external_data == str(out.parent / "small.onnx.data")
    assert _external(out) == {"0.weight", "2.weight"}  # tensors under 256 bytes stay inline (onnx_ir.save)
    assert summary.file_bytes_after == sum(p.stat().st_size for p in out.parent.iterdir())
    shapes = {t.name: tuple(t.dims) for t in onnx.load(str(out)).graph.initializer}  # data read from the file
    assert shapes["0.weight"] == (31, 16) and shapes["2.weight"] == (4, 31)
    assert _digests(tmp_path).items() >= before.items()  # the input and its data are as they were

    monkeypatch.undo()
    inline = strip_onnx(source, tmp_path / "inline.onnx", latency=False)  # the real limit: one file
    assert inline.external_data is None and not _external(tmp_path / "inline.onnx")
    assert not (tmp_path / "inline.onnx.data").exists()


def test_a_failed_strip_leaves_no_external_data_behind(tmp_path, monkeypatch):
    source = _source(tmp_path)
    monkeypatch.setattr(write, "INLINE_LIMIT_BYTES", 1000)
    analyze = rewrite.analyze

    def wrong(model, overrides=None):  # remove neuron 8 (live) instead of 7 (zero)
        analysis = analyze(model, overrides)
        key = next(k for k in analysis.ctx.atoms if isinstance(k, tuple) and k[0].inputs[k[1]].name == "0.bias")
        components = analysis.components.labels[analysis.ctx.atoms[key][0]]
        assert np.flatnonzero(analysis.removable[components]).tolist() == [7]
        analysis.removable[components[7]], analysis.removable[components[8]] = False, True
        return analysis

    monkeypatch.setattr(rewrite, "analyze", wrong)
    with pytest.raises(VerificationError, match="max relative error"):
        strip_onnx(source, tmp_path / "small.onnx", latency=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "mlp.onnx.data"]
