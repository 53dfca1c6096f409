"""Channel analysis of an ONNX graph: the walks of ``channels/analysis.py`` over ``onnx_ir`` nodes.

One forward walk asks each node's rule to couple dimensions and to state which output slices are
exactly zero (where shape inference left a dim symbolic and the rule gives it atoms, such as the
channels of a slice whose bounds ``torch.onnx`` computes from constants, the dim takes the atoms'
size); one backward walk asks it which input slices no consumer reads. The solved coupling,
the removable channels and the groups come from :mod:`compile_toolkit.channels.solve`, the same
code the ATen path uses. A node whose rule raises becomes a barrier naming op, node and error; a
rule that has no exact answer for its node (:class:`~.context.NotCovered`) makes it a barrier
with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..channels import solve
from ..channels.context import mask
from ..channels.rules.base import full
from ..channels.solve import SolvedAnalysis, checked_facts
from ..errors import summary
from .context import Key, NotCovered, OnnxContext, describe, leaf_constant, value_shape
from .rules import Barrier, Failed, FusedAttention, OnnxRule, has_subgraph, rule_for
from .sizes import pin_sources, track


@dataclass
class OnnxChannelAnalysis(SolvedAnalysis):
    """The solved analysis of one ONNX graph (see :func:`analyze`), keyed by values and constant
    uses; ``keep``, ``kept_shape`` and ``barriers`` are the ATen analysis's
    (:class:`~compile_toolkit.channels.solve.SolvedAnalysis`)."""

    ctx: OnnxContext
    rules: dict[ir.Node, OnnxRule]  # the rule each node was analysed (and is rewritten) with
    model: ir.Model

    @property
    def channels_removed(self) -> int:
        return int(self.removable.sum())

    @property
    def barriers(self) -> list[str]:
        """The solved analysis's barriers, and every fused attention node's reason even where no
        group reached it (the shapes of ONNX Runtime's own ops are unknown to ONNX's inference, so
        its weights meet no activation): its heads are kept all the same."""
        fused = {rule.why(node) for node, rule in self.rules.items() if isinstance(rule, FusedAttention)}
        return sorted(set(super().barriers) | fused)


def analyze(model: ir.Model, overrides: Mapping[ir.Node, OnnxRule] | None = None) -> OnnxChannelAnalysis:
    """Run the channel analysis on the main graph of ``model`` (shapes inferred beforehand).

    ``overrides`` replace the rules of some nodes (the strip makes a node whose rewrite failed a
    barrier and analyses again).
    """
    graph = model.graph
    ctx = OnnxContext(dict(model.opset_imports))
    for value in graph.inputs:
        shape = value_shape(value)
        if shape is not None:
            ctx.shapes[value] = shape
            ctx.atoms[value] = [ctx.fresh(s, f"model input {value.name}") for s in shape]
            ctx.zero[value] = ctx.no_facts(shape)
    nodes = list(graph)
    rules = {node: rule_for(node) for node in nodes}
    rules.update(overrides or {})
    for node in nodes:
        _forward(ctx, node, rules)
    for value in graph.outputs:
        ctx.pin_key(value, "model output")
        if value in ctx.sizes:
            pin_sources(ctx, ctx.sizes[value], "model output")
    for key in ctx.atoms:
        ctx.dead[key] = full(ctx.shapes[key], True)
    for value in graph.outputs:
        ctx.mark_live_key(value)
    for node in reversed(nodes):
        _backward(ctx, node, rules)
    components = ctx.table.solve()
    dims = solve.distinct_dims(ctx.atoms.values())
    values = ((d, ctx.zero[key], ctx.dead[key]) for key, d in ctx.atoms.items() if key not in ctx.constant)
    removable, seen = solve.removable_components(values, components)
    solve.keep_one_per_dim(dims, components.labels, removable)
    groups = solve.coupled_groups(dims, _carriers(ctx), components, removable, seen)
    return OnnxChannelAnalysis(ctx=ctx, components=components, removable=removable, groups=groups, rules=rules,
                               model=model)


def _carriers(ctx: OnnxContext) -> list[tuple[str, np.ndarray]]:
    """``initializer:dim`` for each dim of each constant use (a ``Constant`` node's output is
    named by its value's name)."""
    return [(f"{key[0].inputs[key[1]].name}:{d}", atoms) for key, dims in ctx.atoms.items() if isinstance(key, tuple)
            for d, atoms in enumerate(dims)]


def _forward(ctx: OnnxContext, node: ir.Node, rules: dict[ir.Node, OnnxRule]) -> None:
    if _makes_constants(node):
        return
    for index, value in enumerate(node.inputs):
        if value is not None and leaf_constant(value) is not None:
            array = ctx.value_array(value)
            ctx.add_constant_use(node, index, array, f"constant {value.name} could not be read")
    for value in node.outputs:
        shape = value_shape(value)
        if shape is not None:
            ctx.shapes[value] = shape
    keys = [ctx.key(node, i) for i in range(len(node.inputs))]
    present = [k for k in keys if k is not None]
    if present and all(k in ctx.constant for k in present):
        ctx.constant.update(node.outputs)
    missing = _unknown(ctx, node, keys)
    if missing is not None and not isinstance(rules[node], Barrier):
        rules[node] = Barrier(f"{describe(node)}: {missing}")
    try:
        facts = checked_facts(ctx.shapes, node.outputs, rules[node].couple(ctx, node), rules[node].zero(ctx, node))
    except NotCovered as reason:
        rules[node] = Barrier(str(reason))
        facts = list(zip(rules[node].couple(ctx, node), rules[node].zero(ctx, node), strict=True))
    except Exception as error:  # noqa: BLE001 - any failure of a rule is a barrier, not a crash
        rules[node] = failed_rule(node, "coupling and zero facts", error)
        facts = list(zip(rules[node].couple(ctx, node), rules[node].zero(ctx, node), strict=True))
    if has_subgraph(node):
        _pin_captured(ctx, node)
    if not track(ctx, node):
        _pin_sizes_read(ctx, node, rules[node])
    for value, (dims, zeros) in zip(node.outputs, facts, strict=True):
        if dims is not None:
            ctx.shapes[value] = [s if s is not None or a is None else a.size for s, a in zip(ctx.shapes[value], dims,
                                                                                           strict=True)]
            ctx.atoms[value] = dims
            ctx.zero[value] = [mask(a.size, False) if z is None and a is not None else z for a, z in zip(dims, zeros,
                                                                                                      strict=True)]


def _pin_sizes_read(ctx: OnnxContext, node: ir.Node, rule: OnnxRule) -> None:
    """A node that reads sizes (:mod:`.sizes`) without moving them on: the dims they come from
    keep their sizes, unless the rule follows them itself (``sizes_read``)."""
    for index, value in enumerate(node.inputs):
        if value in ctx.sizes and index not in rule.sizes_read:
            pin_sources(ctx, ctx.sizes[value], f"size read by {describe(node)}")


def _unknown(ctx: OnnxContext, node: ir.Node, keys: list[Key | None]) -> str | None:
    """Why the node's rule cannot run (an input or output of unknown rank), or ``None``."""
    for key, value in zip(keys, node.inputs, strict=True):
        if key is not None and key not in ctx.atoms:
            return f"the shape of input {value.name} is unknown"
    for value in node.outputs:
        if value not in ctx.shapes and not omitted(value):
            return f"the shape of output {value.name} is unknown"
    return None


def omitted(value: ir.Value) -> bool:
    """An optional output the node was not asked for (an empty name: ONNX Runtime's
    ``SkipLayerNormalization`` writing only its sum, after two skipped statistics): it has no
    shape, and its rule gives it no facts."""
    return not value.name and not value.uses() and not value.is_graph_output()


def _pin_captured(ctx: OnnxContext, node: ir.Node) -> None:
    """A subgraph reads outer values without listing them as the node's inputs: pin them too."""
    reason = f"read inside a subgraph of {describe(node)}"
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else list(attr.value or [])
        for subgraph in graphs:
            for inner in ir.traversal.RecursiveGraphIterator(subgraph):
                for value in inner.inputs:
                    if value is not None and value in ctx.atoms:
                        ctx.pin_key(value, reason)


def failed_rule(node: ir.Node, step: str, error: BaseException) -> Failed:
    """The barrier a node gets when its rule raised: the report names op, node and error."""
    return Failed(f"channel rule for {describe(node)} failed ({step}): {summary(error)}")


def _backward(ctx: OnnxContext, node: ir.Node, rules: dict[ir.Node, OnnxRule]) -> None:
    if _makes_constants(node):
        return
    keys = [ctx.key(node, i) for i in range(len(node.inputs))]
    ctx.marked = set()
    try:
        rules[node].dead(ctx, node)
    except Exception as error:  # noqa: BLE001 - any failure of a rule is a barrier, not a crash
        rules[node] = failed_rule(node, "dead facts", error)
        for key in [*node.outputs, *keys]:
            if key is not None:
                ctx.pin_key(key, rules[node].reason)
        ctx.marked = set()  # whatever the rule marked before it failed is overridden: all used
    for key in keys:
        if key is not None and key not in ctx.marked:
            ctx.mark_live_key(key)


def _makes_constants(node: ir.Node) -> bool:
    """A ``Constant`` node: its outputs are read as constants by each consumer, not walked."""
    return bool(node.outputs) and all(leaf_constant(v) is not None for v in node.outputs)
