"""The ONNX strip pass: remove the channels the analysis proves zero or dead, exactly.

Every constant use that carries a removed channel is sliced; uses of one initializer that keep
the same indices share one sliced tensor, and the original is sliced in place when every use
(and no graph output) agrees. Rules then fix their node's shape constants (``Reshape`` targets)
and attributes (a depthwise ``Conv``'s ``group``), and every analysed value's static shape is
set to its kept size, so the file's shape information stays true. The result is an ordinary,
smaller graph: no gathers, slices or masks are added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .analysis import OnnxChannelAnalysis, analyze, failed_rule
from .context import NotCovered, OnnxContext, Sizes, leaf_constant
from .rules import Barrier, ShapeChange
from .sizes import resized
from .unshare import merge_back, unshare

Cut = tuple[tuple[int, bytes], ...]  # (dim, kept indices as bytes) for the dims that lose indices


@dataclass
class StripResult(ir.passes.PassResult):
    """The pass's result: ``model`` (edited in place), ``modified``, and the final analysis."""

    analysis: OnnxChannelAnalysis


class StripChannels(ir.passes.InPlacePass):
    """Analyse, plan every rule's rewrite, and apply it all; a node whose rewrite raises is made a
    barrier (nothing was applied yet) and the graph analysed again. A dequantized shared weight
    is read through one copy per reader meanwhile (:mod:`.unshare`)."""

    def call(self, model: ir.Model) -> StripResult:
        copies = unshare(model.graph)
        result = self._strip(model)
        merge_back(model.graph, copies)
        return result

    def _strip(self, model: ir.Model) -> StripResult:
        failed: dict[ir.Node, Barrier] = {}
        while True:
            analysis = analyze(model, failed)
            if not analysis.channels_removed:
                return StripResult(model, False, analysis)
            plan = _plan(analysis)
            if isinstance(plan, _Fault):
                failed[plan.node] = plan.rule
                continue
            _Editor(analysis).apply(plan)
            return StripResult(model, True, analysis)


@dataclass(frozen=True)
class _Fault:
    """A node whose rewrite raised, and the barrier it becomes: :class:`Failed` for a rule that
    broke, a plain barrier naming why for one that has no exact rewrite (:class:`NotCovered`)."""

    node: ir.Node
    rule: Barrier


def _plan(analysis: OnnxChannelAnalysis) -> dict[ir.Node, ShapeChange] | _Fault:
    """Each rule's edits around its node, computed without touching the graph."""
    ctx = analysis.ctx
    plan: dict[ir.Node, ShapeChange] = {}
    memo: dict[ir.Value, np.ndarray | None] = {}  # sizes values run again on the kept sizes, shared by all rules
    for node, rule in analysis.rules.items():
        if isinstance(rule, Barrier) or not all(v in ctx.atoms for v in node.outputs):
            continue
        old = [ctx.shapes[v] for v in node.outputs]
        new = [analysis.kept_shape(v) for v in node.outputs]
        keys = [ctx.key(node, i) for i in range(len(node.inputs))]
        if old == new and all(k is None or ctx.shapes[k] == analysis.kept_shape(k) for k in keys) and \
                not _sizes_change(analysis, node):
            continue
        change = ShapeChange(old, new, lambda i, keys=keys: analysis.keep(keys[i]),
                             lambda i, node=node: ctx.array(node, i),
                             lambda i, node=node: _input_sizes(ctx, node, i),
                             lambda i, node=node: _resized_input(analysis, node, i, memo))
        try:
            rule.rewrite(node, change)
        except NotCovered as reason:  # no exact rewrite for what this strip does around the node
            return _Fault(node, Barrier(str(reason)))
        except Exception as error:  # noqa: BLE001 - a failed rewrite is a barrier, not a crash
            return _Fault(node, failed_rule(node, "rewriting shapes", error))
        if change.attributes or change.constants:
            plan[node] = change
    return plan


def _sizes_change(analysis: OnnxChannelAnalysis, node: ir.Node) -> bool:
    """Whether an input computed from sizes (:mod:`.sizes`) reads a dim that loses indices: the
    node's rule must see it (a ``Reshape`` target read from another tensor's channels) even where
    the node's own inputs and outputs keep their shapes."""
    ctx = analysis.ctx
    for value in node.inputs:
        if value is not None and value in ctx.sizes:
            for key, dim in frozenset().union(*ctx.sizes[value].sources.ravel()):
                if key in ctx.atoms and ctx.shapes[key][dim] != analysis.kept_shape(key)[dim]:
                    return True
    return False


def _input_sizes(ctx: OnnxContext, node: ir.Node, index: int) -> Sizes | None:
    """Input ``index`` of ``node`` as analysed, where it is computed from sizes (:mod:`.sizes`)."""
    value = node.inputs[index] if index < len(node.inputs) else None
    return None if value is None else ctx.sizes.get(value)


def _resized_input(analysis: OnnxChannelAnalysis, node: ir.Node, index: int,
                   memo: dict[ir.Value, np.ndarray | None]) -> Sizes | None:
    """Input ``index`` of ``node``, computed from sizes, as the stripped graph will compute it
    (:func:`~.sizes.resized` on the kept sizes; which entries are known and what they are read
    from, as analysed); ``None`` for an input not computed from sizes. Raises where the chain
    cannot be run again: what the rule would rewrite around it is not known, so the node becomes a
    barrier."""
    ctx = analysis.ctx
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None or value not in ctx.sizes:
        return None
    values = resized(ctx, value, lambda key: analysis.kept_shape(key) if key in ctx.atoms else ctx.shapes[key], memo)
    analysed = ctx.sizes[value]
    if values is None:
        raise ValueError(f"{value.name}, computed from sizes, cannot be computed again on the kept sizes")
    return Sizes(values.reshape(analysed.values.shape), analysed.known, analysed.sources)


@dataclass
class _Editor:
    """Applies a strip to the analysed model's main graph."""

    analysis: OnnxChannelAnalysis
    names: set[str] = field(default_factory=set)

    def apply(self, plan: dict[ir.Node, ShapeChange]) -> None:
        graph = self.analysis.model.graph
        self.names = {v.name for node in graph for v in (*node.inputs, *node.outputs) if v is not None}
        self.names |= set(graph.initializers) | {v.name for v in graph.inputs}
        replaced = {(node, i) for node, change in plan.items() for i in change.constants}
        for value in self._constants():
            self._slice(value, replaced)
        unread = []
        for node, change in plan.items():
            for name, attr in change.attributes.items():
                if attr is None:
                    node.attributes.pop(name, None)
                else:
                    node.attributes[name] = attr
            unread += [self._set_constant(node, index, array) for index, array in change.constants.items()]
        for key in self.analysis.ctx.atoms:
            if isinstance(key, ir.Value) and not key.is_graph_input() and key.shape is not None:
                kept = self.analysis.kept_shape(key)
                # only sizes known in the file shrink: a symbolic dim (batch, tokens) stays symbolic, or
                # ONNX Runtime's optimizer would trust the sample's size (a Reshape it inserts for Gemm
                # then fails at any other batch)
                key.shape = ir.Shape([k if k is not None and isinstance(d, int) else d
                                      for d, k in zip(key.shape, kept, strict=True)])
        for value in unread:
            if value is not None:
                self._drop_if_unused(value)

    def _constants(self) -> list[ir.Value]:
        """Every constant some analysed node reads (each once, in graph order)."""
        seen: dict[ir.Value, None] = {}
        for node in self.analysis.rules:
            for value in node.inputs:
                if value is not None and leaf_constant(value) is not None:
                    seen.setdefault(value, None)
        return list(seen)

    def _cut(self, node: ir.Node, index: int, shape: list[int]) -> Cut:
        key = (node, index)
        if key not in self.analysis.ctx.atoms:
            return ()  # a use the analysis did not see (inside a subgraph): kept whole
        return tuple((d, k.astype(np.int64).tobytes()) for d, k in enumerate(self.analysis.keep(key))
                     if k is not None and len(k) != shape[d])

    def _slice(self, value: ir.Value, replaced: set[tuple[ir.Node, int]]) -> None:
        array = self.analysis.ctx.value_array(value)
        if array is None:
            return
        by_cut: dict[Cut, list[tuple[ir.Node, int]]] = {}
        for use in value.uses():
            if (use.node, use.idx) not in replaced:
                by_cut.setdefault(self._cut(use.node, use.idx, list(array.shape)), []).append((use.node, use.idx))
        cuts = [cut for cut in by_cut if cut]
        if not cuts:
            return
        if len(by_cut) == 1 and value.is_initializer() and not value.is_graph_output():
            sliced = _take(array, cuts[0])
            value.const_value = ir.tensor(sliced, dtype=value.dtype, name=value.name)
            value.shape = ir.Shape(sliced.shape)
            return
        for cut in cuts:
            new = self._initializer(f"{value.name}_stripped", _take(array, cut), value.dtype)
            for node, index in by_cut[cut]:
                node.replace_input_with(index, new)
        self._drop_if_unused(value)

    def _set_constant(self, node: ir.Node, index: int, array: np.ndarray) -> ir.Value | None:
        """Give one use a new constant: in place where it is the initializer's only reader, else
        a new initializer (an omitted optional input is added). Returns the value it no longer
        reads, for :meth:`_drop_if_unused` once every edit is made."""
        old = node.inputs[index] if index < len(node.inputs) else None
        if old is not None and old.is_initializer() and len(old.uses()) == 1 and not old.is_graph_output():
            old.const_value = ir.tensor(array, dtype=old.dtype, name=old.name)
            old.shape = ir.Shape(array.shape)
            return None
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        name = f"{old.name if old is not None else node.name or node.op_type}_stripped"
        dtype = old.dtype if old is not None else ir.DataType.from_numpy(array.dtype)
        node.replace_input_with(index, self._initializer(name, array, dtype))
        return old

    def _initializer(self, base: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
        name, n = base, 1
        while name in self.names:
            name, n = f"{base}_{n}", n + 1
        self.names.add(name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype),
                         const_value=ir.tensor(array, dtype=dtype, name=name))
        self.analysis.model.graph.register_initializer(value)
        return value

    def _drop_if_unused(self, value: ir.Value) -> None:
        """Remove a constant that no node and no graph output reads any more, with the nodes that
        computed it (``Unsqueeze`` of a ``Constant``) as far as nothing else reads them."""
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            return
        graph = self.analysis.model.graph
        if value.is_initializer():
            graph.initializers.pop(value.name)
            return
        producer = value.producer()
        if producer is None or producer.graph is not graph or any(v.uses() or v.is_graph_output()
                                                                    for v in producer.outputs):
            return  # a graph input, a node removed already (two readers let go of it), or one still read
        inputs = [v for v in producer.inputs if v is not None]
        graph.remove(producer, safe=True)
        for v in inputs:
            self._drop_if_unused(v)


def _take(array: np.ndarray, cut: Cut) -> np.ndarray:
    for d, kept in cut:
        array = np.take(array, np.frombuffer(kept, dtype=np.int64), axis=d)
    return np.ascontiguousarray(array)
