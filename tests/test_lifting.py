"""A stripped graph becomes an ExportedProgram without a second torch.export (compile_toolkit.lifting)."""

import io

import pytest
import torch
from conftest import rel_error
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.capture import adopt, capture
from compile_toolkit.errors import CtkError
from compile_toolkit.exporters import export
from compile_toolkit.lifting import lift
from compile_toolkit.pipeline import recording


class Net(nn.Module):
    """Conv, batch norm (buffers), a residual add, a flatten whose size the strip rewrites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv1(x)))
        y = self.conv2(y) + y
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 4), 1))


def _pruned() -> tuple[nn.Module, torch.Tensor]:
    model = Net().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.conv1.weight[:3] = 0
        model.conv1.bias[:3] = 0
        model.bn.weight[:3] = 0  # with the bias: 0 whatever the running statistics
        model.bn.bias[:3] = 0
        model.conv2.weight[:3] = 0
        model.conv2.bias[:3] = 0
    return model, torch.randn(4, 3, 8, 8)


def test_the_stripped_graph_lifts_to_a_smaller_program_that_computes_the_same():
    model, x = _pruned()
    stripped = ctk.strip(model, (x,))
    source = capture(model, (x,))
    program = lift(stripped, source.program)
    sizes = {name: tuple(t.shape) for name, t in program.state_dict.items()}
    assert sizes["conv1.weight"] == (5, 3, 3, 3) and sizes["fc.weight"] == (5, 5 * 16)  # the strip's shapes
    assert "bn.running_mean" in sizes and sizes["bn.running_mean"] == (5,)
    for batch in (4, 1, 7):  # the batch stays symbolic, as in the source program
        inputs = torch.randn(batch, 3, 8, 8)
        assert rel_error(model(inputs), program.module()(inputs)) < 1e-5
    saved = io.BytesIO()
    torch.export.save(program, saved)
    saved.seek(0)
    assert rel_error(model(x), torch.export.load(saved).module()(x)) < 1e-5


def test_the_static_program_is_lifted_with_every_shape_fixed():
    model, x = _pruned()
    captured = capture(model, (x,))
    with recording() as log:
        static = captured.static_program()
    assert log.captures == [] and log.lifted == ["Net at a static batch (XLA)"]
    shapes = [node.meta["val"].shape for node in static.graph.nodes if node.op == "placeholder"]
    assert all(isinstance(size, int) for shape in shapes for size in shape)
    assert static.range_constraints == {}
    assert rel_error(model(x), static.module()(x)) < 1e-5
    with pytest.raises(Exception, match="4"):  # the batch is pinned to the example's
        static.module()(torch.randn(2, 3, 8, 8))


def test_strip_then_export_captures_the_model_once():
    """The positive control first: a graph module nobody lifted is captured when asked for."""
    other, x = _pruned()
    source = capture(other, (x,))
    with recording() as log:
        capture(source.program.module(), (x,))
    assert log.captures == ["GraphModule"]
    model, _ = _pruned()
    with recording() as log:
        stripped = ctk.strip(model, (x,))
        captured = capture(stripped, (x,))
    assert log.captures == ["Net"] and log.lifted == ["the stripped graph"] and log.reused == 1
    assert captured.dynamic_batch and rel_error(model(x), captured.program.module()(x)) < 1e-5


def test_strip_and_export_write_verified_files_from_one_capture(tmp_path):
    model, x = _pruned()
    with recording() as log:
        stripped = ctk.strip(model, (x,))
        artifacts = export(stripped, x, str(tmp_path / "out"), formats=("pt2", "onnx"), reference=model)
    assert [a.format for a in artifacts] == ["pt2", "onnx"]
    assert all(a.max_abs_error < 1e-4 for a in artifacts)
    assert log.captures == ["Net"] and log.lifted == ["the stripped graph"]


def test_a_graph_that_cannot_be_lifted_is_captured_with_the_reason():
    model, x = _pruned()
    source = capture(model, (x,))
    rewritten = source.program.module()
    rewritten.extra = nn.ReLU()
    with rewritten.graph.inserting_before(rewritten.graph.output_node()):
        out = rewritten.graph.output_node().args[0][0]
        relu = rewritten.graph.call_module("extra", (out,))
    rewritten.graph.output_node().args = ((relu,),)
    rewritten.recompile()
    with pytest.raises(CtkError, match="a call of a submodule"):
        lift(rewritten, source.program)
    with recording() as log:
        adopted = adopt(rewritten, source, "a rewrite")
    assert log.lifted == [] and len(log.captures) == 1 and "a rewrite: not liftable" in log.captures[0]
    assert rel_error(torch.relu(model(x)), adopted.program.module()(x)) < 1e-5


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).reshape(x.shape[0], -1) * 2


def test_a_rewrite_that_writes_the_batch_as_a_constant_is_not_lifted_as_dynamic():
    """A reshape whose symbolic batch became the example's batch runs at that batch only: lifting
    it with a dynamic batch would claim what the graph no longer does."""
    x = torch.randn(4, 3, 2)
    source = capture(Flatten(), (x,))
    assert source.dynamic_batch
    rewritten = source.program.module()
    lift(rewritten, source.program)  # the positive control: unchanged, it lifts
    (reshape,) = [n for n in rewritten.graph.nodes if n.target == torch.ops.aten.reshape.default]
    reshape.args = (reshape.args[0], [4, 6])
    rewritten.recompile()
    with pytest.raises(CtkError, match="cannot lift: the rewritten graph does not run at other input sizes"):
        lift(rewritten, source.program)


def test_an_input_named_like_a_builtin_keeps_the_source_programs_name(tmp_path):
    """``nn.Sequential`` takes ``input``, which ``module()`` renames ``input_1``; ONNX's decomposition
    names it ``input`` again, and the program must agree or the ONNX export fails."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10)).eval()
    with torch.no_grad():
        model[0].weight[:3] = 0
        model[0].bias[:3] = 0
    x = torch.randn(8, 1, 8, 8)
    with recording() as log:
        stripped = ctk.strip(model, (x,))
        (onnx,) = export(stripped, x, str(tmp_path / "out"), formats=("onnx",), reference=model)
    assert log.lifted == ["the stripped graph"]
    assert list(capture(stripped, (x,)).program.graph_signature.user_inputs) == ["input"]
    assert onnx.max_abs_error < 1e-4


def test_a_decoder_with_pruned_heads_lifts_with_batch_and_length_dynamic(tmp_path):
    """A grouped-query Llama (transformers) with half its key/value groups zeroed: strip and export
    capture it once, the stripped graph is lifted with batch and length symbolic (its q/k/v
    projections propagate as [batch, tokens, features] only under the python dispatcher, as
    torch.export traces), and the program runs at another batch and length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compile_toolkit.llm import CausalLMLogits

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = CausalLMLogits(LlamaForCausalLM(config).eval()).eval()
    ids = torch.randint(0, 100, (5, 20))
    with recording() as log:
        ctk.prune(model, (ids,), sparsity=0.5, structure="head")
        stripped = ctk.strip(model, (ids,))
        artifacts = export(stripped, ids, str(tmp_path / "out"), formats=("pt2", "onnx"), reference=model)
    assert log.captures == ["CausalLMLogits"] and log.lifted == ["the stripped graph"]
    assert ctk.strip_summary(stripped).channels_removed > 0
    program = capture(stripped, (ids,)).program
    other = torch.randint(0, 100, (3, 11))
    assert rel_error(model(other), program.module()(other)) < 1e-5
    assert all(a.max_abs_error < 1e-4 for a in artifacts)
