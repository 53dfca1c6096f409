"""Atoms: the units in which channels are coupled and removed.

Every tensor dimension of a captured graph is described by an array that gives, for each index
along that dimension, the id of the atom it belongs to. Op rules either reuse their inputs'
arrays (a ReLU's channel ``c`` is its input's channel ``c``), build new ones from them (``cat``
concatenates them; ``flatten`` repeats one channel's atom over its ``H*W`` features), join two
arrays element by element (a residual ``add`` couples the channels of both operands), or pin atoms
that can never be removed (the model's inputs and outputs, and everything an op without a rule
touches). Connected components over the joins are the channels that live or die together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

Atoms = np.ndarray  # int64 ids, one per index of a dimension


@dataclass(frozen=True)
class Components:
    """The solved coupling: which component every atom is in, and why components are pinned."""

    labels: np.ndarray  # atom id -> component id
    pinned: np.ndarray  # component id -> bool
    reasons: dict[int, str]  # component id -> first reason it was pinned

    @property
    def count(self) -> int:
        return len(self.pinned)


class AtomTable:
    """Allocates atoms and records joins and pins; :meth:`solve` turns them into components."""

    def __init__(self) -> None:
        self._next = 0
        self._joins: list[tuple[Atoms, Atoms]] = []
        self._pins: list[tuple[Atoms, str]] = []

    def new(self, size: int) -> Atoms:
        atoms = np.arange(self._next, self._next + size, dtype=np.int64)
        self._next += size
        return atoms

    def pinned(self, size: int, reason: str) -> Atoms:
        atoms = self.new(size)
        self.pin(atoms, reason)
        return atoms

    def join(self, a: Atoms, b: Atoms) -> None:
        if a.shape != b.shape:
            raise ValueError(f"cannot join atom arrays of sizes {a.shape} and {b.shape}")
        if a.size:
            self._joins.append((a, b))

    def pin(self, atoms: Atoms, reason: str) -> None:
        if atoms.size:
            self._pins.append((atoms, reason))

    def solve(self) -> Components:
        n = self._next
        if self._joins:
            rows = np.concatenate([a for a, _ in self._joins])
            cols = np.concatenate([b for _, b in self._joins])
        else:
            rows = cols = np.zeros(0, dtype=np.int64)
        graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
        count, labels = connected_components(graph, directed=False)
        pinned = np.zeros(count, dtype=bool)
        reasons: dict[int, str] = {}
        if self._pins:
            # one vectorised pass: each component's first pin (in pin order) gives its reason
            comps = labels[np.concatenate([atoms for atoms, _ in self._pins])]
            which = np.repeat(np.arange(len(self._pins)), [atoms.size for atoms, _ in self._pins])
            first_comps, first = np.unique(comps, return_index=True)
            pinned[first_comps] = True
            reasons = {int(c): self._pins[i][1] for c, i in zip(first_comps, which[first], strict=True)}
        return Components(labels=labels, pinned=pinned, reasons=reasons)
