"""Channel analysis of a captured graph: which channels are coupled, and which of them can go.

One forward walk asks each op's rule to couple dimensions and to state which output slices are
exactly zero; one backward walk asks it which input slices no consumer depends on. A channel (a
connected component of atoms) is removable when, in every non-constant tensor it appears in,
each of its slices is zero or dead, and no barrier pinned it. See ``docs/architecture.md``
(the channel analysis, and how to add an op rule).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.fx import GraphModule, Node

from ..errors import summary
from ..pipeline import note_analysis
from . import solve
from .atoms import Components
from .context import Context, Dims, concrete, describe, tensor_meta
from .mutation import shared_writes
from .rules import Getitem, rule_for
from .rules.base import Barrier, Failed, OpRule, full
from .solve import ChannelGroup, SolvedAnalysis, checked_facts, removable_components

# Nodes that read only shapes (or nothing) of their inputs: they neither use nor pin channels.
_SHAPE_ONLY = {
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.sym_stride.int,
    torch.ops.aten._assert_tensor_metadata.default,
}


@dataclass
class ChannelAnalysis(SolvedAnalysis):
    """The solved analysis of one graph module (see :func:`analyze`), keyed ``(node, output
    index)``; ``keep``, ``kept_shape`` and ``barriers`` are shared with the ONNX front-end
    (:class:`.solve.SolvedAnalysis`)."""

    ctx: Context
    rules: dict[Node, OpRule]  # the rule each call node was analysed (and is rewritten) with
    gm: GraphModule


def analyze(gm: GraphModule, overrides: Mapping[Node, OpRule] | None = None,
            why: str = "channel analysis") -> ChannelAnalysis:
    """Run the channel analysis on a graph module from ``torch.export(...).module()``.

    ``overrides`` replace the rules of some nodes (the strip pass makes a node whose shape
    rewrite failed a barrier and analyses again). A rule that raises becomes a :class:`Failed`
    barrier naming the op, the node and the error: the analysis never stops on one op. ``why``
    is what the job's pipeline log records for it.
    """
    note_analysis(why)
    values = {n.target: _fetch(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    ctx = Context(values)
    nodes = list(gm.graph.nodes)
    rules = {**node_rules(gm), **(overrides or {})}
    for node in nodes:
        _forward(ctx, node, rules)
    for key in ctx.atoms:
        ctx.dead[key] = full(ctx.shapes[key], True)
    for node in reversed(nodes):
        _backward(ctx, node, rules)
    components = ctx.table.solve()
    removable, seen = _removable(ctx, components)
    groups = _groups(ctx, components, removable, seen)
    return ChannelAnalysis(ctx=ctx, components=components, removable=removable, groups=groups, rules=rules, gm=gm)


def node_rules(gm: GraphModule) -> dict[Node, OpRule]:
    """Each call node's rule: its op's, or a barrier for an in-place write that another node
    reads around (see :mod:`.mutation`), or for an op whose rule could not be chosen."""
    shared = shared_writes(gm.graph)
    rules = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node in shared:
            rules[node] = Barrier(f"in-place {describe(node)} writes memory that {describe(shared[node])} reads")
            continue
        try:
            rules[node] = rule_for(node)
        except Exception as error:  # noqa: BLE001 - any failure of a rule is a barrier, not a crash
            rules[node] = failed_rule(node, "choosing its rule", error)
    return rules


def failed_rule(node: Node, step: str, error: BaseException) -> Failed:
    """The barrier a node gets when its rule raised: the report names op, node and error, and
    the analysis goes on with everything the node touches kept (principle 3)."""
    return Failed(f"channel rule for {describe(node)} failed ({step}): {summary(error)}")


def _fetch(gm: GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _forward(ctx: Context, node: Node, rules: dict[Node, OpRule]) -> None:
    if node.op == "output":
        for arg in node.all_input_nodes:
            for key in ctx.keys_of(arg):
                if key in ctx.atoms:
                    ctx.pin_value(key[0], "model output", key[1])
        return
    if node.op == "get_attr":
        value = ctx.values[node.target]
        if not isinstance(value, torch.Tensor):
            return
        _set_value(ctx, node, value, _tied_atoms(ctx, node, value))
        ctx.constant.add(node)
        try:
            ctx.zero[(node, None)] = ctx.constant_zeros(node)
        except Exception as error:  # noqa: BLE001 - an unreadable constant is kept, not a crash
            ctx.pin_value(node, f"constant {node.target} could not be read: {summary(error)}")
            ctx.zero[(node, None)] = ctx.no_facts(list(value.shape))
        return
    metas = tensor_meta(node.meta.get("val"))
    if node.op == "placeholder":
        if metas:
            ctx.output_counts[node] = None
            shape = [concrete(s) for s in metas[0].shape]
            ctx.shapes[(node, None)] = shape
            ctx.atoms[(node, None)] = [ctx.fresh(s, f"model input {node.name}") for s in shape]
            ctx.zero[(node, None)] = ctx.no_facts(shape)
        return
    if metas is None:
        if node.op == "call_function" and node.target not in _SHAPE_ONLY:
            for arg in node.all_input_nodes:  # reads values we cannot follow (e.g. .item())
                for key in ctx.keys_of(arg):
                    if key in ctx.atoms:
                        ctx.pin_value(key[0], f"values read by {describe(node)}", key[1])
        return
    single = isinstance(node.meta["val"], torch.Tensor)
    ctx.output_counts[node] = None if single else len(metas)
    keys = ctx.keys_of(node)
    for key, meta in zip(keys, metas, strict=False):
        ctx.shapes[key] = [concrete(s) for s in meta.shape]
    inputs = node.all_input_nodes
    if inputs and all(arg in ctx.constant for arg in inputs):
        ctx.constant.add(node)
    try:
        facts = checked_facts(ctx.shapes, keys, rules[node].couple(ctx, node), rules[node].zero(ctx, node))
    except Exception as error:  # noqa: BLE001 - any failure of a rule is a barrier, not a crash
        rules[node] = failed_rule(node, "coupling and zero facts", error)
        facts = list(zip(rules[node].couple(ctx, node), rules[node].zero(ctx, node), strict=True))
    for key, (dims, zeros) in zip(keys, facts, strict=True):
        ctx.atoms[key] = dims
        ctx.zero[key] = zeros


def _set_value(ctx: Context, node: Node, value: torch.Tensor, atoms: Dims) -> None:
    ctx.output_counts[node] = None
    ctx.shapes[(node, None)] = list(value.shape)
    ctx.atoms[(node, None)] = atoms


def _tied_atoms(ctx: Context, node: Node, value: torch.Tensor) -> Dims:
    """Atoms for a parameter; every get_attr of the same target (tied weights) shares them."""
    if node.target not in ctx.attr_atoms:
        ctx.attr_atoms[node.target] = [ctx.table.new(s) for s in value.shape]
    return ctx.attr_atoms[node.target]


def _backward(ctx: Context, node: Node, rules: dict[Node, OpRule]) -> None:
    if node.op == "output":
        for arg in node.all_input_nodes:
            for key in ctx.keys_of(arg):
                ctx.mark_live(key[0], key[1])
        return
    if node.op != "call_function" or node not in ctx.output_counts:
        return
    ctx.marked = set()
    try:
        rules[node].dead(ctx, node)
    except Exception as error:  # noqa: BLE001 - any failure of a rule is a barrier, not a crash
        rules[node] = failed_rule(node, "dead facts", error)
        for arg in [node, *node.all_input_nodes]:
            for key in ctx.keys_of(arg):
                ctx.pin_value(key[0], rules[node].reason, key[1])
        ctx.marked = set()  # whatever the rule marked before it failed is overridden: all used
    if isinstance(rules[node], Getitem):
        return
    for arg in node.all_input_nodes:
        for key in ctx.keys_of(arg):
            if key not in ctx.marked:
                ctx.mark_live(key[0], key[1])


def _removable(ctx: Context, components: Components) -> tuple[np.ndarray, np.ndarray]:
    """(removable, seen in an activation) per component; parameters are sliced along with the
    activations they meet, so only values that depend on a model input decide."""
    values = ((dims, ctx.zero[key], ctx.dead[key]) for key, dims in ctx.atoms.items() if key[0] not in ctx.constant)
    removable, seen = removable_components(values, components)
    keep_one_per_dim(ctx, components.labels, removable)
    return removable, seen


def keep_one_per_dim(ctx: Context, labels: np.ndarray, remove: np.ndarray, scores: np.ndarray | None = None) -> None:
    """Never empty a dimension of the graph (see :func:`.solve.keep_one_per_dim`)."""
    solve.keep_one_per_dim(distinct_dims(ctx), labels, remove, scores)


def distinct_dims(ctx: Context) -> list[np.ndarray]:
    """Every non-empty static dimension's atoms, once per array. Public because pruning walks the
    same dimensions when it keeps one channel per dimension."""
    return solve.distinct_dims(ctx.atoms.values())


def _groups(ctx: Context, components: Components, removable: np.ndarray, seen: np.ndarray) -> list[ChannelGroup]:
    """Coupled groups (:func:`.solve.coupled_groups`), carried by ``parameter:dim`` slices."""
    carriers = ((f"{key[0].target}:{d}", atoms) for key, dims in ctx.atoms.items() if key[0].op == "get_attr"
                for d, atoms in enumerate(dims))
    return solve.coupled_groups(distinct_dims(ctx), carriers, components, removable, seen)
