"""What ONNX op rules read and write while the channel analysis walks a graph.

The facts are those of :mod:`compile_toolkit.channels` (atoms, zero and dead facts per dimension),
keyed for ONNX: a computed tensor is keyed by its ``ir.Value``; a *use* of a constant (an
initializer or a ``Constant`` node's output) is keyed by ``(node, input index)``. Constants get
atoms per use because exporters share one initializer between unrelated layers whenever their
values are equal (``torch.onnx`` gives every fresh BatchNorm's scale and running variance the
same all-ones tensor, read through ``Identity`` nodes): one set of atoms would couple all their
channels. Each use is sliced for the channels its own node keeps, and uses that keep the same
ones still share one tensor in the output file.

Rules address a node's inputs and outputs by position, so they never see the keys.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..channels.context import KeyedFacts, nonzero_facts
from ..channels.solve import DimFacts, Dims
from .evaluate import run_alone

Key = Hashable  # an ir.Value, or (ir.Node, input index) for one use of a constant
Shape = list[int | None]
EVALUATED_SIZE = 1 << 16  # elements: a larger value computed from constants (a whole weight) is not evaluated


class NotCovered(Exception):
    """Raised by a rule for a node it has no exact answer for (a reshape whose target shape is
    computed in the graph, BatchNormalization in training mode): the node becomes a barrier whose
    reason is this message, the way an op without a rule is one."""


def describe(node: ir.Node) -> str:
    """``Conv at node /layer1/conv1/Conv``: how reports name the op and node at fault."""
    op = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
    return f"{op} at node {node.name or '(unnamed)'}"


def value_shape(value: ir.Value) -> Shape | None:
    """Static sizes as ints, symbolic ones (a dynamic batch) as ``None``; ``None`` when even the
    rank is unknown."""
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def leaf_constant(value: ir.Value) -> ir.TensorProtocol | None:
    """The tensor of an initializer or a ``Constant`` node's output; ``None`` for anything else,
    including an initializer that is also a graph input (the caller may override it)."""
    if value.is_graph_input():
        return None
    return ir.convenience.get_const_tensor(value)


@dataclass(frozen=True)
class Sizes:
    """A small integer tensor computed from the sizes of dims (``Shape`` -> ``Gather`` ->
    ``Concat``): per entry its value, whether it is known (a symbolic dim's size is not), and
    the ``(key, dim)`` pairs whose sizes it was computed from."""

    values: np.ndarray  # in the tensor's dtype; 0 where not known
    known: np.ndarray  # bool
    sources: np.ndarray  # object: a frozenset of (key, dim) per entry

    @staticmethod
    def constant(array: np.ndarray) -> Sizes:
        """A constant's entries: all known, from no dim."""
        return Sizes(array, np.ones(array.shape, dtype=bool), _no_sources(array.shape))

    def taken(self, index: np.ndarray) -> Sizes:
        """The entries at ``index`` (flat positions, any shape)."""
        flat = [a.ravel() for a in (self.values, self.known, self.sources)]
        return Sizes(*(a[index.ravel()].reshape(index.shape) for a in flat))


def _no_sources(shape: tuple[int, ...]) -> np.ndarray:
    sources = np.empty(shape, dtype=object)
    sources.fill(frozenset())
    return sources


class OnnxContext(KeyedFacts):
    """Per-key facts of an ONNX graph plus the atom table; rules use the helpers instead of the
    dicts."""

    def __init__(self, opsets: dict[str, int]) -> None:
        super().__init__()
        self.opsets = opsets  # domain -> opset version of the model (probes run the model's ops)
        self.sizes: dict[ir.Value, Sizes] = {}  # values computed from dims' sizes (see :mod:`..sizes`)
        self._arrays: dict[ir.Value, np.ndarray | None] = {}
        self._pairs: dict[ir.Value, tuple[np.ndarray | None, list[np.ndarray]]] = {}
        self._born_pinned: list[tuple[int, int]] = []  # [start, end) of the atom ids fresh() made

    def fresh(self, size: int | None, reason: str) -> np.ndarray | None:
        """Pinned atoms for a dim no input carries (:meth:`KeyedFacts.fresh`), remembered so that
        :meth:`born_pinned` can tell a dim that can never lose an index (the batch, a broadcast
        dim) from one that carries channels."""
        atoms = super().fresh(size, reason)
        if atoms is not None and atoms.size:
            self._born_pinned.append((int(atoms[0]), int(atoms[-1]) + 1))
        return atoms

    def born_pinned(self, atoms: np.ndarray | None) -> bool:
        """Whether every atom of a dim was pinned when it was made (so no index of it is ever
        removed): a symbolic dim (``None``) has no atoms to remove either."""
        if atoms is None or not atoms.size:
            return True
        if not self._born_pinned:
            return False
        starts, ends = np.array(self._born_pinned, dtype=np.int64).T
        at = np.searchsorted(starts, atoms, side="right") - 1
        return bool(np.all((at >= 0) & (atoms < ends[np.maximum(at, 0)])))

    # -- keys -------------------------------------------------------------------------------
    def key(self, node: ir.Node, index: int) -> Key | None:
        """The key of input ``index`` of ``node`` (``None`` for an omitted optional input)."""
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None:
            return None
        return (node, index) if leaf_constant(value) is not None else value

    def present(self, node: ir.Node, index: int) -> bool:
        return self.key(node, index) is not None

    def add_constant_use(self, node: ir.Node, index: int, array: np.ndarray | None, reason: str) -> None:
        """Fresh atoms for one use of a constant, with the constant's own zero facts (``array``
        ``None``: unreadable, so pinned and without facts)."""
        key = (node, index)
        value = node.inputs[index]
        shape = list(array.shape) if array is not None else value_shape(value)
        if shape is None:
            return
        self.shapes[key] = shape
        self.atoms[key] = [self.table.new(s) for s in shape]
        self.constant.add(key)
        if array is None:
            self.pin_key(key, reason)
            self.zero[key] = self.no_facts(shape)
        else:
            self.zero[key] = [m.copy() for m in self._slice_facts(value, array)[1]]

    # -- shapes and atoms -------------------------------------------------------------------
    def shape(self, node: ir.Node, index: int) -> Shape:
        return self.shapes[self.key(node, index)]

    def dims(self, node: ir.Node, index: int) -> Dims:
        return self.atoms[self.key(node, index)]

    def out_shape(self, node: ir.Node, index: int = 0) -> Shape:
        return self.shapes[node.outputs[index]]

    # -- constant values --------------------------------------------------------------------
    def array(self, node: ir.Node, index: int) -> np.ndarray | None:
        """Input ``index`` as a numpy array when it is a constant (seen through ``Identity``
        nodes, which torch.onnx uses to share initializers) or a small value the graph computes
        from constants alone (``Unsqueeze`` of a ``Constant``: what ``torch.onnx`` writes for
        slice bounds without constant folding); ``None`` otherwise."""
        value = node.inputs[index] if index < len(node.inputs) else None
        return None if value is None else self.value_array(value)

    def value_array(self, value: ir.Value) -> np.ndarray | None:
        if value not in self._arrays:
            array = _constant_array(value)
            if array is None and value in self.sizes and self.sizes[value].known.all():
                array = self.sizes[value].values
            self._arrays[value] = array if array is not None or value not in self.constant else self._computed(value)
        return self._arrays[value]

    def _computed(self, value: ir.Value) -> np.ndarray | None:
        """A value computed from constants, run in ONNX Runtime (inputs and output of at most
        ``EVALUATED_SIZE`` elements each; ops of the default domain without subgraphs)."""
        node, shape = value.producer(), value_shape(value)
        if shape is None or None in shape or math.prod(shape) > EVALUATED_SIZE:
            return None
        if node is None or node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
            return None
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return None
        arrays = [None if v is None else self.value_array(v) for v in node.inputs]
        if any(a is None and v is not None for a, v in zip(arrays, node.inputs, strict=True)):
            return None
        if sum(a.size for a in arrays if a is not None) > EVALUATED_SIZE:
            return None
        outputs = run_alone(self.opsets, [node], [arrays[1:]], arrays[0])
        return None if outputs is None else outputs[value.index()]

    def nonzero_pairs(self, node: ir.Node, index: int) -> np.ndarray | None:
        """``[size0, size1]`` bool for a constant input of rank >= 2 (``None`` otherwise): which
        (dim 0, dim 1) index pairs hold a nonzero anywhere in the other dims. Scanned once per
        tensor: weights are most of an analysis's reading."""
        value = node.inputs[index]
        array = self.value_array(value)
        return None if array is None else self._slice_facts(value, array)[0]

    def _slice_facts(self, value: ir.Value, array: np.ndarray) -> tuple[np.ndarray | None, list[np.ndarray]]:
        if value not in self._pairs:
            self._pairs[value] = nonzero_facts(array != 0)
        return self._pairs[value]

    # -- zero and dead facts ----------------------------------------------------------------
    def zeros(self, node: ir.Node, index: int) -> DimFacts:
        return self.zero[self.key(node, index)]

    def out_dead(self, node: ir.Node, index: int = 0) -> DimFacts:
        return self.dead[node.outputs[index]]

    def mark_dead(self, node: ir.Node, index: int, masks: DimFacts) -> None:
        """AND a consumer's view into an input's dead facts (every consumer must ignore a slice)."""
        key = self.key(node, index)
        if key is not None:
            self.mark_dead_key(key, masks)

    def mark_live_key(self, key: Key) -> None:
        if key in self.dead:
            self.dead[key] = [None if m is None else np.zeros_like(m) for m in self.dead[key]]


def shape_read(node: ir.Node, rank: int) -> range:
    """The dims a ``Shape`` node reports (its ``start`` and ``end``, clamped as Python slices are)."""
    start, end = node.attributes.get("start"), node.attributes.get("end")
    return range(rank)[slice(None if start is None else start.as_int(), None if end is None else end.as_int())]


def _constant_array(value: ir.Value) -> np.ndarray | None:
    """The numpy value of a constant, following ``Identity`` nodes back to it."""
    while value is not None:
        tensor = leaf_constant(value)
        if tensor is not None:
            try:
                return tensor.numpy()
            except Exception:  # noqa: BLE001 - unreadable (missing external data): no value known
                return None
        producer = value.producer()
        if producer is None or producer.op_type != "Identity" or producer.domain not in ("", "ai.onnx"):
            return None
        value = producer.inputs[0]
    return None
