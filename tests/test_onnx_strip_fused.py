"""ONNX Runtime's fused transformer ops, as ``onnxruntime.transformers.optimizer`` writes them for a
BERT export (``com.microsoft`` ``Attention`` or ``MultiHeadAttention``, ``EmbedLayerNormalization``,
``SkipLayerNormalization``, ``BiasGelu`` or ``FastGelu``): the strip removes pruned heads and
neurons through them, lowers ``num_heads``, and reaches the parameters of the same export
stripped before fusing; the file it writes runs exactly in ORT. Positive controls: the fused
file with nothing zeroed loses nothing, and a head whose queries and keys are zero (its values
are not) is kept."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_onnx_strip_attention import bert, ids
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.onnx_strip import strip_onnx

HEADS, HIDDEN = 4, 64


class WithMask(nn.Module):
    """BERT's hidden states from ids and an attention mask: the optimizer fuses attention only
    where the mask is an input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.model(ids, attention_mask=mask)[0]


def export_bert(model: nn.Module, path) -> str:
    x = ids()
    axes = {"batch": 0, "seq": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(WithMask(model).eval(), (x, torch.ones_like(x)), str(path), dynamo=False,
                          input_names=["ids", "mask"], dynamic_axes={n: {v: k for k, v in axes.items()}
                                                                     for n in ("ids", "mask")})
    return str(path)


def fuse(path: str, out, multi_head: bool = False) -> str:
    """The optimizer's fused file: ``Attention`` and ``BiasGelu`` by default; ``MultiHeadAttention``
    over separate q/k/v ``MatMul`` nodes and ``FastGelu`` with ``multi_head``."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.use_multi_head_attention = options.enable_gelu_approximation = multi_head
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = optimizer.optimize_model(path, model_type="bert", num_heads=HEADS, hidden_size=HIDDEN, opt_level=0,
                                         optimization_options=options)
    fused.save_model_to_file(str(out))
    return str(out)


def fused_ops(path) -> dict[str, tuple[str, int | None]]:
    """Per com.microsoft node: its op type and ``num_heads`` (``None`` where it has none)."""
    nodes = onnx.load(str(path)).graph.node
    return {n.name: (n.op_type, next((a.i for a in n.attribute if a.name == "num_heads"), None))
            for n in nodes if n.domain == "com.microsoft"}


def shapes(path) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def pruned_export(tmp_path_factory) -> str:
    """The tiny BERT with 2 of 4 heads per layer and half its intermediate neurons zeroed."""
    model = bert("eager")
    ctk.prune(model, (ids(),), sparsity=0.5, structure="head")
    return export_bert(model, tmp_path_factory.mktemp("pruned") / "bert.onnx")


@pytest.mark.parametrize("multi_head", [False, True], ids=["Attention", "MultiHeadAttention"])
def test_fused_bert_strips_heads_and_neurons_like_the_unfused_file(pruned_export, tmp_path, multi_head):
    fused = fuse(pruned_export, tmp_path / "fused.onnx", multi_head)
    attention = "MultiHeadAttention" if multi_head else "Attention"
    assert sorted(op for op, _ in fused_ops(fused).values()) == sorted(
        [attention] * 2 + ["BiasGelu" if not multi_head else "FastGelu"] * 2 + ["SkipLayerNormalization"] * 4
        + ["EmbedLayerNormalization"])

    summary = strip_onnx(fused, tmp_path / "fused.small.onnx", latency=False)
    unfused = strip_onnx(pruned_export, tmp_path / "bert.small.onnx", latency=False)
    assert summary.max_relative_error <= 1e-5 and unfused.max_relative_error <= 1e-5
    assert summary.parameters_before == unfused.parameters_before == 74048
    assert summary.parameters_after == unfused.parameters_after == 40960  # 2 heads and 64 neurons per layer
    ops = fused_ops(tmp_path / "fused.small.onnx")
    assert {heads for op, heads in ops.values() if op == attention} == {2}
    assert len(ops) == 9  # every fused node is still there
    weights = shapes(tmp_path / "fused.small.onnx")
    if not multi_head:
        assert weights["Attention_0_qkv_weight"] == weights["Attention_1_qkv_weight"] == (64, 96)
    assert sum(1 for s in weights.values() if s == (64, 64)) == 4  # up and down projections: 128 -> 64 neurons
    assert not any("com.microsoft::Attention" in b or "MultiHeadAttention" in b for b in summary.barriers)


@pytest.fixture(scope="module")
def dense_fused(tmp_path_factory) -> str:
    """The same BERT with nothing zeroed, fused."""
    folder = tmp_path_factory.mktemp("dense")
    return fuse(export_bert(bert("eager"), folder / "bert.onnx"), folder / "fused.onnx")


def test_fused_bert_with_nothing_zeroed_loses_nothing(dense_fused, tmp_path):
    summary = strip_onnx(dense_fused, tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == 0 and summary.parameters_after == summary.parameters_before
    heads = [g for g in summary.groups if "Attention_0_qkv_weight:1" in g.carriers]
    assert [(g.channels, g.kept, g.kept_because) for g in heads] == [(HEADS, HEADS, None)]  # a channel per head:
    # not zero, not dead, not pinned
    assert {h for op, h in fused_ops(tmp_path / "small.onnx").values() if op == "Attention"} == {HEADS}


def _zero(model: onnx.ModelProto, name: str, index) -> None:
    """Zero ``index`` of initializer ``name`` in place."""
    tensor = next(t for t in model.graph.initializer if t.name == name)
    array = numpy_helper.to_array(tensor).copy()
    array[index] = 0
    tensor.CopyFrom(numpy_helper.from_array(array, name))


def _output_projection(model: onnx.ModelProto, attention: str) -> str:
    node = next(n for n in model.graph.node if n.name == attention)
    return next(n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[0] == node.output[0])


def test_hand_zeroed_heads_go_through_attention_and_a_head_with_live_values_stays(dense_fused, tmp_path):
    """Layer 0: head 1's values zeroed (its output is zero: removed), head 3's queries and keys
    zeroed (uniform attention over live values: kept). Layer 1: head 2's rows of the output
    projection zeroed (its output is dead: removed)."""
    model = onnx.load(dense_fused)
    size = HIDDEN // HEADS
    v_head1 = slice(2 * HIDDEN + size, 2 * HIDDEN + 2 * size)
    _zero(model, "Attention_0_qkv_weight", (slice(None), v_head1))
    _zero(model, "Attention_0_qkv_bias", v_head1)
    for start in (3 * size, HIDDEN + 3 * size):
        _zero(model, "Attention_0_qkv_weight", (slice(None), slice(start, start + size)))
        _zero(model, "Attention_0_qkv_bias", slice(start, start + size))
    _zero(model, _output_projection(model, "Attention_1"), slice(2 * size, 3 * size))
    onnx.save(model, tmp_path / "zeroed.onnx")

    summary = strip_onnx(tmp_path / "zeroed.onnx", tmp_path / "small.onnx", latency=False)
    assert summary.max_relative_error <= 1e-5
    ops = fused_ops(tmp_path / "small.onnx")
    assert ops["Attention_0"] == ops["Attention_1"] == ("Attention", HEADS - 1)
    weights = shapes(tmp_path / "small.onnx")
    assert weights["Attention_0_qkv_weight"] == weights["Attention_1_qkv_weight"] == (HIDDEN, 3 * (HIDDEN - size))
    kept = numpy_helper.to_array(next(t for t in onnx.load(str(tmp_path / "small.onnx")).graph.initializer
                                      if t.name == "Attention_0_qkv_weight"))
    assert np.count_nonzero(~kept.any(0)) == 2 * size  # head 3's zero queries and keys are still there
    assert summary.parameters_before - summary.parameters_after == 2 * (3 * (HIDDEN + 1) * size + size * HIDDEN)


class GPT2Hidden(nn.Module):
    """GPT-2's hidden states from ids and an attention mask, without the cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(ids, attention_mask=mask, use_cache=False)[0]


def test_fused_gpt2_strips_like_ctk_strip_through_skip_layer_norms_without_statistics(tmp_path):
    """A tiny GPT-2 (hidden 64, 4 heads, 2 layers, inner 128) with half its heads and neurons
    zeroed, fused by the optimizer for ``gpt2``: ``SkipLayerNormalization`` writes only its norm
    and its sum (the statistics omitted), ``FastGelu`` its neurons. The strip removes what
    ``ctk.strip`` removes from the PyTorch model, within 1%, exactly in ORT."""
    from onnxruntime.transformers import optimizer
    from test_onnx_strip_attention import TOKENS, VOCAB, trained
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=2 * TOKENS, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_inner=128,
                        attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    model, x = trained(GPT2Hidden(GPT2Model(config))), ids()
    inputs = (x, torch.ones_like(x))
    ctk.prune(model, inputs, sparsity=0.5, structure="head")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(tmp_path / "gpt2.onnx"), dynamo=False, input_names=["ids", "mask"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("ids", "mask")})
        fused = optimizer.optimize_model(str(tmp_path / "gpt2.onnx"), model_type="gpt2", num_heads=HEADS,
                                         hidden_size=HIDDEN, opt_level=0)
    fused.save_model_to_file(str(tmp_path / "fused.onnx"))
    norms = [n for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node if n.op_type == "SkipLayerNormalization"]
    assert len(norms) == 4 and all(list(n.output[1:3]) in ([], ["", ""]) for n in norms)

    summary = strip_onnx(tmp_path / "fused.onnx", tmp_path / "small.onnx", latency=False)
    assert summary.max_relative_error <= 1e-5
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in ctk.strip(model, inputs).parameters())
    removed = summary.parameters_before - summary.parameters_after
    assert summary.parameters_before == before and abs(removed - (before - after)) <= 0.01 * (before - after)
    weights = shapes(tmp_path / "small.onnx")
    assert weights["model.h.0.attn.c_attn.weight"] == weights["model.h.1.attn.c_attn.weight"] == (HIDDEN, 96)
    assert weights["model.h.0.mlp.c_fc.weight"] == (HIDDEN, 64)
    assert not any("SkipLayerNormalization" in b for b in summary.barriers)
