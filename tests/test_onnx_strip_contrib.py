"""Rules for ONNX Runtime's ``com.microsoft`` ops on hand-made graphs, each verified in ONNX
Runtime by ``strip_onnx``: neurons go through ``QuickGelu``, ``Gelu`` and ``FastGelu`` (zero
where the input is and the op maps zero plus its bias to zero, as ORT computes it), hidden
features stay pinned by ``SimplifiedLayerNormalization`` and ``SkipSimplifiedLayerNormalization``;
``Attention`` with unequal ``qkv_hidden_sizes`` loses a head and rewrites both attributes; an
``Attention`` with a present cache, ``GroupQueryAttention`` and an unknown ``com.microsoft`` op
are barriers that name themselves. Positive controls: a zero neuron whose bias makes
``FastGelu`` nonzero is kept; the zero heads behind a barrier are kept."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from test_onnx_strip import weights

from compile_toolkit.onnx_strip import strip_onnx

MS = "com.microsoft"


def ms_node(op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, name=outputs[0] or op, domain=MS, **attrs)


def model(nodes: list[onnx.NodeProto], tensors: dict[str, np.ndarray], hidden: int, outputs: list[str],
          extra_outputs: list[onnx.ValueInfoProto] = ()) -> onnx.ModelProto:
    """``x`` of ``[batch, seq, hidden]`` in, float outputs of unknown shape out."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          ["batch", "seq", hidden])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
                              + list(extra_outputs),
                              [numpy_helper.from_array(a, n) for n, a in tensors.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])


def shapes(path) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in onnx.load(str(path)).graph.initializer}


def test_neurons_go_through_fused_activations_and_simplified_norms_pin_the_hidden(tmp_path):
    """Three MLP branches off an RMS norm, summed by a skip RMS norm: neurons 3 and 4 of w1 are
    zero (QuickGelu), neuron 5 of the Gelu branch is unread (w4's row), neuron 8 of w5 is zero
    with a zero bias (FastGelu: removed) and neuron 7 zero with bias 0.5 (gelu(0.5): kept)."""
    t = {"s": weights(16) + 1, "g": weights(16) + 1, "w1": weights(16, 32), "w2": weights(32, 16),
         "w3": weights(16, 32), "w4": weights(32, 16), "w5": weights(16, 32), "b5": weights(32), "w6": weights(32, 16)}
    t["w1"][:, [3, 4]] = 0
    t["w4"][5] = 0
    t["w5"][:, [7, 8]] = 0
    t["b5"][7], t["b5"][8] = 0.5, 0
    nodes = [
        helper.make_node("SimplifiedLayerNormalization", ["x", "s"], ["h"], name="rms", axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["h", "w1"], ["u"]), ms_node("QuickGelu", ["u"], ["a"], alpha=1.702),
        helper.make_node("MatMul", ["a", "w2"], ["d"]),
        helper.make_node("MatMul", ["h", "w3"], ["v"]), ms_node("Gelu", ["v"], ["c"]),
        helper.make_node("MatMul", ["c", "w4"], ["e"]),
        helper.make_node("MatMul", ["h", "w5"], ["p"]), ms_node("FastGelu", ["p", "b5"], ["q"]),
        helper.make_node("MatMul", ["q", "w6"], ["f"]), helper.make_node("Add", ["d", "f"], ["df"]),
        ms_node("SkipSimplifiedLayerNormalization", ["df", "e", "g"], ["y"], epsilon=1e-5),
    ]
    onnx.save(model(nodes, t, 16, ["y"]), str(tmp_path / "mlp.onnx"))
    summary = strip_onnx(tmp_path / "mlp.onnx", tmp_path / "small.onnx", latency=False)
    assert summary.max_relative_error <= 1e-5 and summary.channels_removed == 4
    got = shapes(tmp_path / "small.onnx")
    assert (got["w1"], got["w2"], got["w3"], got["w4"], got["w5"], got["b5"], got["w6"]) == \
        ((16, 30), (30, 16), (16, 31), (31, 16), (16, 31), (31,), (31, 16))
    assert got["s"] == got["g"] == (16,)
    assert any("SkipSimplifiedLayerNormalization" in b or "SimplifiedLayerNormalization" in b
               for b in summary.barriers)  # the hidden features are kept, and the report says by what


def _attention(tmp_path, present: bool) -> str:
    """``x`` [B, S, 16] -> Attention(2 heads) -> MatMul; head 1's values and their bias are zero.
    Without a cache, query and key have 4 features per head and value 6 (``qkv_hidden_sizes``);
    with one (``present``: [2, B, heads, S, head size]) all heads are 4 wide, as the cache needs."""
    value = 4 if present else 6
    w, b, o = weights(16, 16 + 2 * value), weights(16 + 2 * value), weights(2 * value, 16)
    w[:, 16 + value:], b[16 + value:] = 0, 0
    outputs = ["att", "present"] if present else ["att"]
    sizes = {} if present else {"qkv_hidden_sizes": [8, 8, 12]}
    nodes = [ms_node("Attention", ["x", "w", "b"], outputs, num_heads=2, **sizes),
             helper.make_node("MatMul", ["att", "o"], ["y"])]
    extra = [helper.make_tensor_value_info("present", TensorProto.FLOAT, None)] if present else []
    path = tmp_path / f"attention{'_present' if present else ''}.onnx"
    onnx.save(model(nodes, {"w": w, "b": b, "o": o}, 16, ["y"], extra), str(path))
    return str(path)


def test_attention_with_unequal_value_heads_loses_a_head_and_rewrites_its_sizes(tmp_path):
    summary = strip_onnx(_attention(tmp_path, present=False), tmp_path / "small.onnx", latency=False)
    assert summary.max_relative_error <= 1e-5 and summary.channels_removed == 1
    assert shapes(tmp_path / "small.onnx") == {"w": (16, 14), "b": (14,), "o": (6, 16)}
    node = next(n for n in onnx.load(str(tmp_path / "small.onnx")).graph.node if n.op_type == "Attention")
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {"num_heads": 1,
                                                                               "qkv_hidden_sizes": [4, 4, 6]}


def test_attention_with_a_cache_and_an_unknown_op_are_named_barriers(tmp_path):
    summary = strip_onnx(_attention(tmp_path, present=True), tmp_path / "small.onnx", latency=False)
    assert summary.channels_removed == 0 and summary.max_relative_error <= 1e-5
    assert any("com.microsoft::Attention at node att" in b and "present cache" in b for b in summary.barriers)

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), ms_node("Unheard", ["h"], ["y"])]
    w = weights(16, 8)
    w[:, 2] = 0
    onnx.save(model(nodes, {"w": w}, 16, ["y"]), str(tmp_path / "unknown.onnx"))
    # ORT cannot run an op it does not know either: the analysis alone names it
    from onnx_ir import load
    from onnx_ir.passes.common import ShapeInferencePass

    from compile_toolkit.onnx_strip.analysis import analyze

    ir_model = load(str(tmp_path / "unknown.onnx"))
    ShapeInferencePass(strict_mode=False)(ir_model)
    analysis = analyze(ir_model)
    assert analysis.channels_removed == 0
    assert any("com.microsoft::Unheard at node y" in b for b in analysis.barriers)


def test_symbolic_shape_inference_that_gives_up_leaves_nothing_in_the_current_folder(tmp_path, monkeypatch):
    """An op neither ONNX nor ONNX Runtime's symbolic inference knows: the latter gives up and saves
    the half-inferred model (``sym_shape_infer_temp.onnx`` and a data file) into the current folder;
    the strip runs it in a scratch folder, and the user's folder stays empty."""
    from onnx_ir import load

    from compile_toolkit.onnx_strip.contrib_shapes import infer_shapes

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), ms_node("Unheard", ["h"], ["u"]),
             helper.make_node("Relu", ["u"], ["y"])]
    onnx.save(model(nodes, {"w": weights(16, 2048)}, 16, ["y"]), str(tmp_path / "unknown.onnx"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert "u" in infer_shapes(load(str(tmp_path / "unknown.onnx")))  # the unknown op's output stays unshaped
    assert list(cwd.iterdir()) == []


def test_grouped_query_attention_is_a_named_barrier_that_keeps_its_heads(tmp_path):
    """GroupQueryAttention (4 query heads of 8 over 2 key/value heads) has no rule: its key/value
    head 1 and the query heads sharing it are zero and kept all the same, and the report says
    what to do; a zero neuron of the MLP after it still goes."""
    t = {"wq": weights(16, 32), "wk": weights(16, 16), "wv": weights(16, 16), "w1": weights(32, 24),
         "w2": weights(24, 16), "total": np.array(5, dtype=np.int32)}
    t["wq"][:, 16:], t["wk"][:, 8:], t["wv"][:, 8:] = 0, 0, 0
    t["w1"][:, 3] = 0
    nodes = [helper.make_node("MatMul", ["x", w], [w[1]]) for w in ("wq", "wk", "wv")]
    nodes += [ms_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens", "total"], ["att", "pk", "pv"],
                      num_heads=4, kv_num_heads=2),
              helper.make_node("MatMul", ["att", "w1"], ["u"]), helper.make_node("Relu", ["u"], ["r"]),
              helper.make_node("MatMul", ["r", "w2"], ["y"])]
    proto = model(nodes, t, 16, ["y"])
    proto.graph.input.append(helper.make_tensor_value_info("seqlens", TensorProto.INT32, [1]))
    for dim, size in zip(proto.graph.input[0].type.tensor_type.shape.dim, (1, 5), strict=False):
        dim.dim_value = size  # one sequence of 5 tokens: the total length the op is given
    # the attention's output shape, declared as the optimizer's files do: ORT's symbolic shape inference
    # gives up on a GQA without a past cache ("Incomplete symbolic shape inference")
    proto.graph.value_info.append(helper.make_tensor_value_info("att", TensorProto.FLOAT, [1, 5, 32]))
    onnx.save(proto, str(tmp_path / "gqa.onnx"))
    summary = strip_onnx(tmp_path / "gqa.onnx", tmp_path / "small.onnx", latency=False)
    assert summary.max_relative_error <= 1e-5 and summary.channels_removed == 1
    got = shapes(tmp_path / "small.onnx")
    assert (got["wq"], got["wk"], got["wv"], got["w1"]) == ((16, 32), (16, 16), (16, 16), (32, 23))
    named = [b for b in summary.barriers if "com.microsoft::GroupQueryAttention at node att" in b]
    assert len(named) == 1 and "strip the exported file before" in named[0]
