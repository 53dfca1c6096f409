"""What op rules read and write while the channel analysis walks a graph.

Values are keyed by ``(node, index)``: ``index`` is ``None`` for a node that produces one tensor
and the position in the tuple for nodes that produce several (``getitem`` reads them back).
For each value the context holds, per dimension:

- ``atoms``: the atom array (see :mod:`.atoms`), ``None`` for a symbolic dimension (the batch);
- ``zero``: bool array, ``True`` where the slice at that index is exactly zero (forward fact);
- ``dead``: bool array, ``True`` where no consumer's result depends on that slice (backward fact).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Node

from .atoms import Atoms, AtomTable

Key = tuple[Node, int | None]
Dims = list[Atoms | None]
Masks = list[np.ndarray | None]


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


class Context:
    """Per-value facts plus the atom table; rules use the helpers instead of the dicts."""

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        self.table = AtomTable()
        self.values = values  # get_attr target -> real tensor
        self.atoms: dict[Key, Dims] = {}
        self.attr_atoms: dict[str, Dims] = {}  # get_attr target -> atoms (tied weights share)
        self.zero: dict[Key, Masks] = {}
        self.dead: dict[Key, Masks] = {}
        self.shapes: dict[Key, list[int | None]] = {}
        self.constant: set[Node] = set()  # nodes whose values depend on no model input
        self.marked: set[Key] = set()  # inputs the current rule gave dead facts for
        self.output_counts: dict[Node, int | None] = {}  # None: one tensor; n: a tuple of n

    def keys_of(self, node: Node) -> list[Key]:
        count = self.output_counts.get(node)
        return [(node, None)] if count is None else [(node, i) for i in range(count)]

    # -- shapes and atoms ------------------------------------------------------------------
    def shape(self, arg: Node, index: int | None = None) -> list[int | None]:
        return self.shapes[(arg, index)]

    def dims(self, arg: Node, index: int | None = None) -> Dims:
        return self.atoms[(arg, index)]

    def fresh(self, size: int | None, reason: str) -> Atoms | None:
        """Atoms for an output dimension that no input dimension carries (spatial, new axes)."""
        return None if size is None else self.table.pinned(size, reason)

    def join(self, a: Atoms | None, b: Atoms | None, reason: str) -> None:
        """Couple two dimensions; a static one coupled with a symbolic one is pinned."""
        if a is None and b is None:
            return
        if a is None or b is None:
            self.table.pin(a if b is None else b, reason)
            return
        self.table.join(a, b)

    def pin_value(self, arg: Node, reason: str, index: int | None = None) -> None:
        for atoms in self.atoms.get((arg, index), []):
            if atoms is not None:
                self.table.pin(atoms, reason)

    # -- tensor values ---------------------------------------------------------------------
    def value(self, arg: Any) -> torch.Tensor | None:
        """The real tensor behind a ``get_attr`` node (parameters, buffers, constants)."""
        if isinstance(arg, Node) and arg.op == "get_attr":
            return self.values[arg.target]
        return None

    # -- forward zero facts ----------------------------------------------------------------
    def zeros(self, arg: Any, index: int | None = None) -> Masks:
        """Zero facts of an argument; ``None`` arguments have none."""
        return self.zero[(arg, index)]

    def no_facts(self, shape: list[int | None]) -> Masks:
        return [None if s is None else np.zeros(s, dtype=bool) for s in shape]

    # -- backward dead facts ---------------------------------------------------------------
    def dead_of(self, node: Node, index: int | None = None) -> Masks:
        return self.dead[(node, index)]

    def mark_dead(self, arg: Any, masks: Masks, index: int | None = None) -> None:
        """AND a consumer's view into ``arg``'s dead facts (every consumer must ignore a slice)."""
        if not isinstance(arg, Node) or (arg, index) not in self.dead:
            return
        self.marked.add((arg, index))
        current = self.dead[(arg, index)]
        for d, mask in enumerate(masks):
            if current[d] is None:
                continue
            current[d] = current[d] & (np.zeros_like(current[d]) if mask is None else mask)

    def mark_live(self, arg: Any, index: int | None = None) -> None:
        if isinstance(arg, Node) and (arg, index) in self.dead:
            self.mark_dead(arg, [None] * len(self.dead[(arg, index)]), index)


def mask(size: int | None, fill: bool) -> np.ndarray | None:
    return None if size is None else np.full(size, fill, dtype=bool)


def all_dead(masks: Masks) -> bool:
    """A value is wholly ignored if every index of some dimension is ignored."""
    return any(m is not None and m.size and m.all() for m in masks)
