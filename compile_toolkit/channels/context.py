"""What op rules read and write while the channel analysis walks a graph.

Values are keyed by ``(node, index)``: ``index`` is ``None`` for a node that produces one tensor
and the position in the tuple for nodes that produce several (``getitem`` reads them back).
For each value the context holds, per dimension:

- ``atoms``: the atom array (see :mod:`.atoms`), ``None`` for a symbolic dimension (the batch);
- ``zero``: bool array, ``True`` where the slice at that index is exactly zero (forward fact);
- ``dead``: bool array, ``True`` where no consumer's result depends on that slice (backward fact).

What both front-ends share (the atom table, these facts, joins, pins and merging dead facts) is
:class:`KeyedFacts`; :class:`Context` adds the ATen keys and the graph's constant tensors.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from .atoms import Atoms, AtomTable
from .solve import DimFacts, Dims

Key = tuple[Node, int | None]
# DimFacts: one fact per dimension, per index: ``True`` where the slice is zero (``zero``) or ignored
# (``dead``). Not pruning's ``Masks`` (per parameter, ``True`` = kept): the two are read the opposite way.


def describe(node: Node) -> str:
    """``aten.conv2d at node conv2d_3``: how reports name the op and node at fault."""
    return f"{op_name(node)} at node {node.name}"


def op_name(node: Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target.overloadpacket)
    return getattr(target, "__name__", str(target))


def tensor_meta(value: Any) -> list[torch.Tensor] | None:
    """The fake tensor(s) a node produces, as a list (``None`` if it produces no tensors)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    return None


def concrete(size: Any) -> int | None:
    """An int for a static size, ``None`` for a symbolic one."""
    try:
        return int(size) if not isinstance(size, torch.SymInt) else None
    except TypeError:
        return None


class KeyedFacts:
    """The atom table and the facts per value, whatever a front-end keys its values by (ATen:
    ``(node, output index)``; ONNX: a value, or one use of a constant). Both front-ends' contexts
    extend it, so rules of either IR couple, pin and combine dead facts through the same code, and
    the IR-agnostic helpers (:mod:`.shapes`, :mod:`.weights`) take either context."""

    def __init__(self) -> None:
        self.table = AtomTable()
        self.atoms: dict[Hashable, Dims] = {}
        self.zero: dict[Hashable, DimFacts] = {}
        self.dead: dict[Hashable, DimFacts] = {}
        self.shapes: dict[Hashable, list[int | None]] = {}
        self.constant: set[Hashable] = set()  # what depends on no model input
        self.marked: set[Hashable] = set()  # inputs the current rule gave dead facts for

    def fresh(self, size: int | None, reason: str) -> Atoms | None:
        """Atoms for an output dimension that no input dimension carries (spatial, new axes)."""
        return None if size is None else self.table.pinned(size, reason)

    def join(self, a: Atoms | None, b: Atoms | None, reason: str) -> None:
        """Couple two dimensions; a static one coupled with a symbolic one is pinned."""
        if a is None or b is None:
            self.pin(a if b is None else b, reason)
            return
        self.table.join(a, b)

    def pin(self, atoms: Atoms | None, reason: str) -> None:
        """Keep every channel of a dimension, for ``reason``. A symbolic dimension (``None``,
        the batch) has no atoms and carries no channels, so there is nothing to pin: rules pass
        any dimension without checking."""
        if atoms is not None:
            self.table.pin(atoms, reason)

    def pin_key(self, key: Hashable, reason: str) -> None:
        """Keep every channel of every dimension of a value (nothing if it has no atoms)."""
        for atoms in self.atoms.get(key, []):
            self.pin(atoms, reason)

    def no_facts(self, shape: list[int | None]) -> DimFacts:
        return [None if s is None else np.zeros(s, dtype=bool) for s in shape]

    def mark_dead_key(self, key: Hashable, masks: DimFacts) -> None:
        """AND a consumer's view into a value's dead facts (every consumer must ignore a slice);
        a key without dead facts (not a walked tensor) is left alone."""
        if key not in self.dead:
            return
        self.marked.add(key)
        current = self.dead[key]
        for d, facts in enumerate(masks):
            if current[d] is not None:
                current[d] = current[d] & (np.zeros_like(current[d]) if facts is None else facts)


class Context(KeyedFacts):
    """Per-value facts of a ``torch.fx`` graph plus the atom table; rules use the helpers instead
    of the dicts."""

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.values = values  # get_attr target -> real tensor
        self.attr_atoms: dict[str, Dims] = {}  # get_attr target -> atoms (tied weights share)
        self.output_counts: dict[Node, int | None] = {}  # None: one tensor; n: a tuple of n
        self._slice_facts: dict[str, tuple[np.ndarray | None, DimFacts]] = {}  # get_attr target -> facts

    def keys_of(self, node: Node) -> list[Key]:
        count = self.output_counts.get(node)
        return [(node, None)] if count is None else [(node, i) for i in range(count)]

    # -- shapes and atoms ------------------------------------------------------------------
    def shape(self, arg: Node, index: int | None = None) -> list[int | None]:
        return self.shapes[(arg, index)]

    def dims(self, arg: Node, index: int | None = None) -> Dims:
        return self.atoms[(arg, index)]

    def pin_value(self, arg: Node, reason: str, index: int | None = None) -> None:
        self.pin_key((arg, index), reason)

    # -- tensor values ---------------------------------------------------------------------
    def value(self, arg: Any) -> torch.Tensor | None:
        """The real tensor behind a ``get_attr`` node (parameters, buffers, constants)."""
        if isinstance(arg, Node) and arg.op == "get_attr":
            return self.values[arg.target]
        return None

    def nonzero_pairs(self, arg: Any) -> np.ndarray | None:
        """``[size0, size1]`` bool for a constant of rank >= 2 (``None`` for anything else):
        which (dim 0, dim 1) index pairs, e.g. a weight's (output, input) channel pairs, hold a
        nonzero anywhere in the other dims.

        Read-only and computed once per constant with its zero slices: convolution and linear
        rules ask for it in both walks, and scanning large weights is most of an analysis.
        """
        if not isinstance(arg, Node) or arg.op != "get_attr":
            return None
        return self._facts(arg)[0]

    def constant_zeros(self, node: Node) -> DimFacts:
        """Zero facts of a constant (fresh arrays): per dim, which slices are all zero."""
        return [m.copy() for m in self._facts(node)[1]]

    def _facts(self, node: Node) -> tuple[np.ndarray | None, DimFacts]:
        if node.target not in self._slice_facts:
            self._slice_facts[node.target] = slice_facts(self.values[node.target])
        return self._slice_facts[node.target]

    # -- forward zero facts ----------------------------------------------------------------
    def zeros(self, arg: Any, index: int | None = None) -> DimFacts:
        """Zero facts of an argument; ``None`` arguments have none."""
        return self.zero[(arg, index)]

    # -- backward dead facts ---------------------------------------------------------------
    def dead_of(self, node: Node, index: int | None = None) -> DimFacts:
        return self.dead[(node, index)]

    def mark_dead(self, arg: Any, masks: DimFacts, index: int | None = None) -> None:
        """AND a consumer's view into ``arg``'s dead facts (every consumer must ignore a slice)."""
        if isinstance(arg, Node):
            self.mark_dead_key((arg, index), masks)

    def mark_live(self, arg: Any, index: int | None = None) -> None:
        if isinstance(arg, Node) and (arg, index) in self.dead:
            self.mark_dead(arg, [None] * len(self.dead[(arg, index)]), index)


def slice_facts(value: torch.Tensor) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """(nonzero (dim 0, dim 1) pairs or ``None`` below rank 2, per-dim all-zero slices).

    One scan of the tensor whatever its rank, in numpy: on CPU its boolean reductions are many
    times faster than torch's for the small weights of a convnet. A NaN counts as nonzero.
    """
    return nonzero_facts(_as_array(value.detach().cpu()) != 0)


def nonzero_facts(nonzero: np.ndarray) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """:func:`slice_facts` of a boolean array (``True`` where the tensor is nonzero), whatever
    the tensor's origin: the ONNX front-end reads its initializers with numpy."""
    if nonzero.ndim < 2:
        return None, [~nonzero] if nonzero.ndim == 1 else []
    s0, s1 = nonzero.shape[:2]
    flat = nonzero.reshape(s0, s1, math.prod(nonzero.shape[2:]))
    pairs = flat.any(-1) if flat.shape[2] != 1 else flat[:, :, 0].copy()
    pairs.flags.writeable = False
    masks = [~pairs.any(1), ~pairs.any(0)]
    if nonzero.ndim > 2:
        rest = nonzero.reshape(s0 * s1, *nonzero.shape[2:]).any(0)
        for d in range(rest.ndim):
            others = tuple(k for k in range(rest.ndim) if k != d)
            masks.append(~(rest.any(axis=others) if others else rest))
    return pairs, masks


def _as_array(value: torch.Tensor) -> np.ndarray:
    """The tensor as numpy; dtypes numpy lacks (bfloat16, float8) as their nonzero pattern."""
    try:
        return value.numpy()
    except TypeError:
        return (value != 0).numpy()


def mask(size: int | None, fill: bool) -> np.ndarray | None:
    return None if size is None else np.full(size, fill, dtype=bool)


def all_dead(masks: DimFacts) -> bool:
    """A value is wholly ignored if every index of some dimension is ignored."""
    return any(m is not None and m.size and m.all() for m in masks)
