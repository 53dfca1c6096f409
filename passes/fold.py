"""Constant folding: a weight computed from parameters alone becomes a plain constant.

Some layers compute their weight in ``forward``: timm's ``ScaledStdConv2d`` standardises it with
``F.batch_norm`` over ``in_channels * kh * kw`` and scales it by a gain. Read as a graph, that
normalisation makes every input channel of the weight change the others' statistics, so the
channel analysis pins them all and nothing strips. In eval mode the result depends on no input:
computed once, it is an ordinary convolution weight, whose zero rows and unread columns strip
removes like any other.

Folding trades the model's own parameterisation (``weight`` and ``gain``; ``torch.nn.utils.prune``'s
``weight_orig * weight_mask``) for one tensor, so a subgraph is folded only where that frees
channels: where the analysis pins some channel of its result when it reads the subgraph and not
when it reads the result as a constant. A fold never makes the model larger (its result has at
most as many elements as the constants it reads). The folded tensor is a parameter when it was
computed from one, on the module of its largest source, as ``<name>_folded``; sources nothing
reads any more are deleted, so parameter counts describe the folded model.

torch has two constant folders, and neither fits: ``torch._inductor.constant_folding`` runs every
node whose inputs it knows, in-place ones included (``torch.export`` graphs keep ``zero_`` and
``relu_``: it would write into the model's parameters) and registers every result as a buffer;
``torch.fx.experimental.const_fold`` turns the module into a ``FoldedGraphModule`` that folds on
its first call.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from compile_toolkit.channels.analysis import ChannelAnalysis, analyze
from compile_toolkit.channels.context import Context, Dims, concrete, tensor_meta
from compile_toolkit.channels.mutation import written_roots
from compile_toolkit.channels.rules.base import OpRule, output_shapes

from .base import GraphPass, PassResult


@dataclass(frozen=True)
class Fold:
    """How one folded constant was computed: ``sources`` (``get_attr`` target -> the tensor it
    read) and ``compute``, the folded subgraph as a module taking them in that order. Pruning
    calls it to find which parameter slices zero which slices of the result."""

    sources: dict[str, torch.Tensor]
    compute: GraphModule

    def __call__(self, values: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The folded value, with ``values`` (source name -> tensor) in place of those sources."""
        values = values or {}
        with torch.no_grad():
            return self.compute(*(values.get(name, value) for name, value in self.sources.items()))


Folds = dict[str, Fold]  # the new attribute's get_attr target -> how it was computed


class ConstantFolding(GraphPass):
    """Folds the parameter-only subgraphs whose folding frees channels (see the module
    docstring); ``details`` is the :data:`Folds` it made."""

    name = "fold"

    def __call__(self, gm: GraphModule) -> PassResult:
        subgraphs = _subgraphs(gm)
        freeing = _freeing(gm, list(subgraphs)) if subgraphs else []
        folds = {root: _extract(gm, root, subgraphs[root]) for root in freeing}  # all read before any rewiring
        made: Folds = {_replace(gm, root, fold): fold for root, fold in folds.items()}
        if made:
            _erase_unread(gm, [node for root in freeing for node in subgraphs[root]])
            gm.recompile()
        return PassResult(gm, bool(made), made)


def _subgraphs(gm: GraphModule) -> dict[Node, list[Node]]:
    """Each root of a parameter-only subgraph (a node computed from constants alone that some
    other node reads) -> the subgraph's nodes in graph order, its ``get_attr`` sources included.
    A root whose result would outgrow its sources is not folded; its inputs become roots."""
    written = written_roots(gm.graph)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    refused: set[Node] = set()
    while True:
        inside = _constant_nodes(gm.graph, written, refused)
        roots = {node: _upstream(node, inside, order) for node in gm.graph.nodes
                 if node in inside and node.op != "get_attr" and any(user not in inside for user in node.users)}
        too_big = {root for root, nodes in roots.items() if not _fits(gm, root, nodes)}
        if not too_big:
            return roots
        refused |= too_big


def _constant_nodes(graph: Graph, written: set[Node], refused: set[Node]) -> set[Node]:
    """Constants that nothing writes in place, and pure nodes that read only those (and at least
    one of them: a constructor such as ``arange`` is cheaper to run than to store)."""
    written_targets = {node.target for node in written if node.op == "get_attr"}
    inside: set[Node] = set()
    for node in graph.nodes:
        if node in refused or node in written:
            continue
        if node.op == "get_attr" and node.target not in written_targets:
            inside.add(node)
        elif _pure(node) and node.all_input_nodes and all(arg in inside for arg in node.all_input_nodes):
            inside.add(node)
    return inside


def _pure(node: Node) -> bool:
    """An ATen op (or a ``getitem`` of one) that only computes tensors: it writes nothing and
    draws no random numbers, so computing it once gives what every call would."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return tensor_meta(node.meta.get("val")) is not None


def _upstream(root: Node, inside: set[Node], order: dict[Node, int]) -> list[Node]:
    """``root`` and every node of ``inside`` it is computed from, in graph order."""
    seen, stack = {root}, [root]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg in inside and arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return sorted(seen, key=order.__getitem__)


def _fits(gm: GraphModule, root: Node, nodes: list[Node]) -> bool:
    """One tensor of static shape, no larger than the constants it is computed from."""
    value = root.meta.get("val")
    if not isinstance(value, torch.Tensor) or any(concrete(s) is None for s in value.shape):
        return False
    sources = [_attribute(gm, node.target) for node in nodes if node.op == "get_attr"]
    if not all(isinstance(source, torch.Tensor) for source in sources):
        return False
    return math.prod(concrete(s) for s in value.shape) <= sum(source.numel() for source in sources)


def _freeing(gm: GraphModule, roots: list[Node]) -> list[Node]:
    """The roots whose folding frees channels: an index of the root's result whose channel the
    analysis pins while it reads the subgraph, and leaves free (and carried by an activation) when
    it reads the result as a constant, as it will once folded."""
    as_read = analyze(gm, why="constant folding: channels as the subgraphs are read")
    as_folded = analyze(gm, {root: _Constant() for root in roots}, "constant folding: channels once folded")
    carried = _in_activations(as_folded)
    return [root for root in roots
            if (_pinned(as_read, root) & ~_pinned(as_folded, root) & _at(as_folded, root, carried)).any()]


class _Constant(OpRule):
    """A root read as the constant it will be: fresh channels, coupled only by its readers."""

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        return [[None if s is None else ctx.table.new(s) for s in shape] for shape in output_shapes(ctx, node)]


def _pinned(analysis: ChannelAnalysis, node: Node) -> np.ndarray:
    return _at(analysis, node, analysis.components.pinned)


def _at(analysis: ChannelAnalysis, node: Node, per_component: np.ndarray) -> np.ndarray:
    """``per_component`` at every index of every static dim of ``node``'s value, concatenated."""
    labels = analysis.components.labels
    dims = [per_component[labels[atoms]] for atoms in analysis.ctx.atoms[(node, None)] if atoms is not None]
    return np.concatenate(dims) if dims else np.zeros(0, dtype=bool)


def _in_activations(analysis: ChannelAnalysis) -> np.ndarray:
    """Per component: whether a value computed from the model's inputs carries it."""
    seen = np.zeros(analysis.components.count, dtype=bool)
    for key, dims in analysis.ctx.atoms.items():
        if key[0] not in analysis.ctx.constant:
            for atoms in dims:
                if atoms is not None:
                    seen[analysis.components.labels[atoms]] = True
    return seen


def _extract(gm: GraphModule, root: Node, nodes: list[Node]) -> Fold:
    """The subgraph as a module of its own, its sources as inputs."""
    graph = Graph()
    env: dict[Node, Node] = {}
    sources: dict[str, torch.Tensor] = {}
    inputs: dict[str, Node] = {}
    for node in nodes:
        if node.op == "get_attr":
            if node.target not in inputs:
                inputs[node.target] = graph.placeholder(node.name)
                sources[node.target] = _attribute(gm, node.target)
            env[node] = inputs[node.target]
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[root])
    return Fold(sources, GraphModule(nn.Module(), graph))


def _replace(gm: GraphModule, root: Node, fold: Fold) -> str:
    """Store the folded value on the module of its largest source and read it where ``root``
    was read; returns its target."""
    value = fold().detach().clone(memory_format=torch.contiguous_format)
    largest = max(fold.sources, key=lambda name: fold.sources[name].numel())
    owner_name, _, attr = largest.rpartition(".")
    owner = gm.get_submodule(owner_name)
    name = next(n for n in (f"{attr}_folded{suffix}" for suffix in _suffixes()) if not hasattr(owner, n))
    params = [s for s in fold.sources.values() if isinstance(s, nn.Parameter)]
    if params:
        owner.register_parameter(name, nn.Parameter(value, requires_grad=any(p.requires_grad for p in params)))
    else:
        owner.register_buffer(name, value)
    target = f"{owner_name}.{name}" if owner_name else name
    with gm.graph.inserting_before(root):
        constant = gm.graph.get_attr(target)
    constant.meta.update(root.meta)
    root.replace_all_uses_with(constant)
    return target


def _erase_unread(gm: GraphModule, nodes: list[Node]) -> None:
    """Erase the folded nodes nothing reads now, and delete the attributes no node reads."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    erased = set()
    for node in sorted(set(nodes), key=order.__getitem__, reverse=True):
        if not node.users:
            if node.op == "get_attr":
                erased.add(node.target)
            gm.graph.erase_node(node)
    still_read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for target in erased - still_read:
        owner_name, _, name = target.rpartition(".")
        delattr(gm.get_submodule(owner_name), name)


def _suffixes() -> Iterator[str]:
    """``""``, ``"_1"``, ``"_2"``, ...: a name taken by another attribute gets the next one."""
    yield ""
    yield from (f"_{n}" for n in itertools.count(1))


def _attribute(gm: GraphModule, target: str) -> object:
    owner_name, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner_name), name)
