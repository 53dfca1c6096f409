"""``strip_onnx`` removes attention heads: a tiny BERT and a tiny grouped-query Llama (random
weights, biases and norms perturbed as after training) with heads and MLP neurons pruned by the
toolkit, exported here by ``torch.onnx`` (both exporters, eager and SDPA attention), strip to
``ctk.strip``'s parameters on the PyTorch model, verified in ONNX Runtime; positive controls keep
heads that are not wholly zero."""

from __future__ import annotations

import warnings
from collections import Counter

import onnx
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import compile_toolkit as ctk
from compile_toolkit.onnx_strip import strip_onnx
from compile_toolkit.pruning.llm.structured import prune_llm_structured

VOCAB, TOKENS = 100, 8


class Hidden(nn.Module):
    """BERT's last hidden states (the first output of its ModelOutput)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)[0]


class Logits(nn.Module):
    """A decoder's logits without the cache; the all-ones attention mask keeps transformers from
    looking for packed sequences (``torch.diff``, which the TorchScript exporter lacks)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


def trained(model: nn.Module) -> nn.Module:
    """Biases and norm scales moved off their initial zeros and ones (exporters share equal
    initializers, and a zero bias would make a pruned unit's bias trivially zero)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def bert(attn: str) -> nn.Module:
    """Hidden 64, 4 heads of 16, 2 layers, intermediate 128."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=TOKENS, type_vocab_size=1,
                        attn_implementation=attn)
    return trained(Hidden(BertModel(config, add_pooling_layer=False)))


def llama(attn: str) -> nn.Module:
    """Hidden 64, 8 query heads of 8 over 4 key/value heads, 2 layers, intermediate 128."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=32, use_cache=False,
                         attn_implementation=attn)
    return trained(LlamaForCausalLM(config))


def export(model: nn.Module, ids: torch.Tensor, path, dynamo: bool) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (ids,), str(path), dynamo=True, input_names=["ids"], verbose=False)
        else:
            torch.onnx.export(model, (ids,), str(path), dynamo=False, input_names=["ids"],
                              dynamic_axes={"ids": {0: "batch"}})
    return str(path)


def ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, TOKENS), generator=torch.Generator().manual_seed(1))


def product_weights(path) -> Counter:
    """Shapes of the constant matrices the file multiplies by (a Linear's weight, transposed)."""
    model = onnx.load(str(path))
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return Counter(shapes[n.input[1]] for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                   and n.input[1] in shapes and len(shapes[n.input[1]]) == 2)


def linear_weights(model: nn.Module, stripped: nn.Module) -> Counter:
    """The same for ``ctk.strip``'s module: the weight of each of ``model``'s Linears, ``[in, out]``."""
    return Counter(tuple(stripped.get_parameter(f"{name}.weight").shape[::-1]) for name, m in model.named_modules()
                   if isinstance(m, nn.Linear))


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_like_ctk_strip(model: nn.Module, x: torch.Tensor, source: str, out) -> tuple[ctk.OnnxStripSummary, int]:
    """Strip ``source`` and hold it to ``ctk.strip`` of ``model``: verified in ONNX Runtime, the
    same matrix shapes (heads and neurons gone), within 1% of its parameters removed; returns the
    summary and ``ctk.strip``'s parameter count. The file's count differs from the model's by what
    the exporter wrote beside the weights (the dynamo exporter folds the embeddings of constant
    token types and positions into ``[batch, tokens, hidden]`` tensors; shape constants), so the
    counts after are compared by the callers where the file holds the model's parameters."""
    summary = strip_onnx(source, out, latency=False)
    stripped = ctk.strip(model, (x,))
    assert summary.max_relative_error <= 1e-5
    assert product_weights(out) == linear_weights(model, stripped)
    removed, expected = summary.parameters_before - summary.parameters_after, parameters(model) - parameters(stripped)
    assert abs(removed - expected) <= 0.01 * expected
    return summary, parameters(stripped)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_bert_with_pruned_heads_and_neurons_strips_like_ctk_strip(tmp_path, attn, dynamo):
    """Half the heads (2 of 4 per layer) and half the MLP neurons zeroed by ``ctk.prune``: the
    query, key and value projections keep 2 heads * 16 rows, the output projection 32 columns."""
    model, x = bert(attn), ids()
    report = ctk.prune(model, (x,), sparsity=0.5, structure="head")
    assert report.pruned > 0
    source = export(model, x, tmp_path / "bert.onnx", dynamo)
    summary, after = check_like_ctk_strip(model, x, source, tmp_path / "bert.small.onnx")
    if not dynamo:  # the TorchScript exporter writes the model's parameters as they are
        assert summary.parameters_before == parameters(model) and summary.parameters_after == after
    weights = product_weights(tmp_path / "bert.small.onnx")
    assert weights[(64, 32)] == 3 * 2 and weights[(32, 64)] == 2  # q, k, v and o of 2 layers
    assert not any(b.startswith("MatMul at node") for b in summary.barriers)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_grouped_query_llama_strips_key_value_groups_and_neurons(tmp_path, attn, dynamo):
    """2 of 4 key/value groups (each read by 2 query heads) and half the MLP neurons pruned by
    ``prune_llm_structured``: q keeps 4 heads * 8 rows, k and v 2 heads * 8, o 32 columns,
    up/gate/down 64 neurons; rotary embedding and the key/value repeat (``Expand``, ``Reshape``)
    follow the heads. The TorchScript exporter computes the repeat's target through
    ``Equal``/``Where``/``ConstantOfShape`` and merges the heads with ``reshape(*input_shape, -1)``
    (the batch read from the layer's input): followed, the ``-1`` known from the output
    projection's features."""
    base = llama(attn)
    calibration = [torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    prune_llm_structured(base, calibration, "kv_group", 0.5)
    prune_llm_structured(base, calibration, "neuron", 0.5)
    model, x = Logits(base).eval(), ids()
    source = export(model, x, tmp_path / "llama.onnx", dynamo=dynamo)
    summary, after = check_like_ctk_strip(model, x, source, tmp_path / "llama.small.onnx")
    weights = product_weights(tmp_path / "llama.small.onnx")
    assert (weights[(64, 32)], weights[(64, 16)], weights[(32, 64)]) == (2, 4, 2)  # q; k, v; o per layer
    if not dynamo:  # the TorchScript exporter writes the model's parameters as they are
        assert summary.parameters_before == parameters(model) and summary.parameters_after == after
    assert not any("self_attn/Reshape_" in b or "Expand" in b for b in summary.barriers), summary.barriers


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_unpruned_bert_strips_nothing(tmp_path, dynamo):
    """Positive control: no zero head, no zero neuron, nothing removed."""
    model, x = bert("sdpa"), ids()
    summary = strip_onnx(export(model, x, tmp_path / "bert.onnx", dynamo), tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == 0
    assert summary.parameters_after == summary.parameters_before


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_head_only_partly_zero_is_kept(tmp_path, dynamo):
    """Positive control: head 1 of layer 0 with zero queries, keys and values but for one value
    feature (its softmax is uniform, so it outputs that feature's mean): the head stays, while
    head 2, wholly zero, goes."""
    model, x = bert("eager"), ids()
    attention = model.model.encoder.layer[0].attention.self
    with torch.no_grad():
        for layer in (attention.query, attention.key, attention.value):
            for head in (1, 2):
                layer.weight[16 * head:16 * head + 16] = 0
                layer.bias[16 * head:16 * head + 16] = 0
        attention.value.weight[16 + 3] = 1.0
    source = export(model, x, tmp_path / "bert.onnx", dynamo)
    summary = strip_onnx(source, tmp_path / "small.onnx", latency=False)
    assert summary.max_relative_error <= 1e-5
    weights = product_weights(tmp_path / "small.onnx")
    assert weights[(64, 48)] == 3 and weights[(48, 64)] == 1  # layer 0: 3 heads of 16 kept
    assert summary.parameters_before - summary.parameters_after == 3 * (64 * 16 + 16) + 16 * 64


def window_attention(parts: range) -> nn.Module:
    """torchvision's Swin window attention, 16 features in 4 heads of 4, windows of 4 x 4 shifted
    by 2, head 1 zeroed in the ``parts`` of its fused ``qkv`` projection (0: q, 1: k, 2: v)."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    torch.manual_seed(0)
    model = ShiftedWindowAttention(16, [4, 4], [2, 2], num_heads=4).eval()
    with torch.no_grad():
        for part in parts:
            model.qkv.weight[part * 16 + 4:part * 16 + 8] = 0
            model.qkv.bias[part * 16 + 4:part * 16 + 8] = 0
    return model


@pytest.mark.parametrize("parts, removed", [(range(3), 1), (range(2), 0)], ids=["whole-head", "value-kept"])
def test_swin_window_attention_loses_a_zero_head_at_any_batch(tmp_path, parts, removed):
    """The TorchScript export pads to whole windows (``Pad`` computed from sizes), unpacks the fused
    ``qkv`` with ``Gather`` and splits the batch into batch and windows for the shift mask; a head
    zero in q, k and v goes as in ``ctk.strip`` (its rows of ``qkv``, its column of the position
    bias, its columns of ``proj``), the head reshapes' targets written as constants that run at
    another batch too. A head whose values are not zero is kept (positive control)."""
    import numpy as np
    import onnxruntime

    model, x = window_attention(parts), torch.randn(2, 8, 8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp_path / "swin.onnx"), dynamo=False, do_constant_folding=False,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    summary = strip_onnx(tmp_path / "swin.onnx", tmp_path / "small.onnx", latency=False)
    stripped = ctk.strip(model, (x,))
    assert summary.max_relative_error <= 1e-5 and summary.channels_removed == removed
    shapes = {t.name: tuple(t.dims) for t in onnx.load(str(tmp_path / "small.onnx")).graph.initializer}
    expected = {"qkv.weight": (48 - 12 * removed, 16), "qkv.bias": (48 - 12 * removed,),
                "proj.weight": (16, 16 - 4 * removed), "relative_position_bias_table": (49, 4 - removed)}
    assert {name: shapes[name] for name in expected} == expected == \
        {name: tuple(stripped.get_parameter(name).shape) for name in expected}
    other = torch.randn(3, 8, 8, 16)
    session = onnxruntime.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    [out] = session.run(None, {"x": other.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(other).numpy(), rtol=1e-5, atol=1e-5)
