"""ONNX Runtime's fused attention (``com.microsoft::Attention``, as ``onnxruntime.transformers.
optimizer`` writes it for a BERT export) has no channel rule: the strip keeps its heads, names the
op and says what to do instead (strip before fusing), and the file it writes still runs exactly.
Positive control: the same export, not fused, loses its pruned heads."""

from __future__ import annotations

import warnings

import onnx
import torch
from test_onnx_strip_attention import bert, ids, product_weights
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.onnx_strip import strip_onnx


class WithMask(nn.Module):
    """BERT's hidden states from ids and an attention mask: the optimizer fuses attention only
    where the mask is an input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.model(ids, attention_mask=mask)[0]


def test_fused_attention_is_a_named_barrier_and_the_unfused_file_loses_heads(tmp_path):
    from onnxruntime.transformers import optimizer

    model, x = bert("eager"), ids()
    ctk.prune(model, (x,), sparsity=0.5, structure="head")  # 2 of 4 heads per layer
    wrapped, mask = WithMask(model).eval(), torch.ones_like(x)
    axes = {"batch": 0, "seq": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (x, mask), str(tmp_path / "bert.onnx"), dynamo=False, input_names=["ids", "mask"],
                          dynamic_axes={n: {v: k for k, v in axes.items()} for n in ("ids", "mask")})
        fused = optimizer.optimize_model(str(tmp_path / "bert.onnx"), model_type="bert", num_heads=4, hidden_size=64,
                                         opt_level=0)
    fused.save_model_to_file(str(tmp_path / "fused.onnx"))
    nodes = onnx.load(str(tmp_path / "fused.onnx")).graph.node
    assert [n.name for n in nodes if n.op_type == "Attention"] == ["Attention_0", "Attention_1"]

    summary = strip_onnx(tmp_path / "fused.onnx", tmp_path / "fused.small.onnx", latency=False)
    assert summary.max_relative_error <= 1e-5
    named = [b for b in summary.barriers if b.startswith("ONNX Runtime's fused attention com.microsoft::Attention")]
    assert len(named) == 2 and "strip the exported file before" in named[0]
    shapes = {t.name: tuple(t.dims) for t in onnx.load(str(tmp_path / "fused.small.onnx")).graph.initializer}
    assert shapes["Attention_0_qkv_weight"] == shapes["Attention_1_qkv_weight"] == (64, 192)  # 4 heads kept

    unfused = strip_onnx(tmp_path / "bert.onnx", tmp_path / "bert.small.onnx", latency=False)
    assert unfused.max_relative_error <= 1e-5
    weights = product_weights(tmp_path / "bert.small.onnx")
    assert weights[(64, 32)] == 3 * 2 and weights[(32, 64)] == 2  # q, k, v and o keep 2 heads in both layers
