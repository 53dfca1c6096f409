"""From walked facts to decisions: which channels can go, and which channels form groups.

Nothing here knows the graph's IR: the inputs are atom arrays (one per tensor dimension), the
zero and dead facts of each non-constant value, and the names of the constants that carry each
dimension. The ATen analysis (:mod:`.analysis`) and the ONNX front-end
(:mod:`compile_toolkit.onnx_strip`) walk their own graphs with their own op rules and share
these steps, so a channel is removable by the same rule whichever IR it came from. They share
the check of a rule's facts against the node's shapes (:func:`checked_facts`) and what the
solved analysis answers (:class:`SolvedAnalysis`: kept indices, barriers) as well.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .atoms import Atoms, Components

if TYPE_CHECKING:
    from .context import KeyedFacts

# One dimension's atoms (``None``: a symbolic dimension) and its facts, per index.
Dims = list[Atoms | None]
DimFacts = list[np.ndarray | None]


@dataclass
class ChannelGroup:
    """A set of coupled channels that are scored and removed together (one layer's outputs,
    a residual stream, a concatenation). ``carriers`` name each ``parameter:dim`` that holds them."""

    index: int
    components: np.ndarray  # component ids in this group
    carriers: list[str]
    pinned_reason: str | None  # why (some of) its channels must stay
    prunable: np.ndarray = field(repr=False)  # component ids that pruning may zero
    removable: int = 0  # how many of its channels the strip pass can remove

    @property
    def size(self) -> int:
        return len(self.components)


class RuleFailure:
    """Marks the barrier that replaces a rule that raised, in either front-end: its ``reason``
    names the op, the node and the error, and the analysis reports it even where it kept no
    constant's channels (a failed rule is a bug to fix)."""

    reason: str


@dataclass
class SolvedAnalysis:
    """What a solved analysis holds whichever IR it walked, and the reads both strips make of it."""

    ctx: KeyedFacts
    components: Components
    removable: np.ndarray  # component id -> bool
    groups: list[ChannelGroup]
    rules: dict[Any, Any]  # the rule each node was analysed (and is rewritten) with

    def keep(self, key: Hashable) -> list[np.ndarray | None]:
        """Indices kept along each dim of a value (``None`` for symbolic dims)."""
        labels = self.components.labels
        return [None if a is None else np.flatnonzero(~self.removable[labels[a]]) for a in self.ctx.atoms[key]]

    def kept_shape(self, key: Hashable) -> list[int | None]:
        return [None if k is None else len(k) for k in self.keep(key)]

    @property
    def barriers(self) -> list[str]:
        """Distinct reasons that kept constant-carried channels alive, and every rule that failed
        (named even where it kept no constant's channels: it is a bug to fix)."""
        failed = {rule.reason for rule in self.rules.values() if isinstance(rule, RuleFailure)}
        return sorted({g.pinned_reason for g in self.groups if g.pinned_reason} | failed)


def checked_facts(
    shapes: Mapping[Hashable, list[int | None]], keys: list[Hashable], couplings: list[Dims | None],
    zeros: list[DimFacts | None],
) -> list[tuple[Dims | None, DimFacts | None]]:
    """A rule's atoms and zero facts for the values ``keys`` a node produces, after checking that
    they fit the values' shapes: a rule that gets them wrong would corrupt the walks and the strip
    far from the fault. An output of unknown shape given no facts at all (a barrier's, in ONNX)
    has nothing to check."""
    if not len(keys) == len(couplings) == len(zeros):
        raise ValueError(f"rule gave facts for {len(couplings)}/{len(zeros)} outputs, the node has {len(keys)}")
    for key, dims, masks in zip(keys, couplings, zeros, strict=True):
        if dims is None and masks is None and key not in shapes:
            continue
        shape = shapes[key]
        sizes = [[None if a is None else a.size for a in dims], [None if m is None else m.size for m in masks]]
        if any(len(got) != len(shape) or any(None not in (g, s) and g != s for g, s in zip(got, shape, strict=True))
               for got in sizes):
            raise ValueError(f"rule's atoms {sizes[0]} or zero facts {sizes[1]} do not fit shape {shape}")
    return list(zip(couplings, zeros, strict=True))


def removable_components(
    values: Iterable[tuple[Dims, DimFacts, DimFacts]], components: Components
) -> tuple[np.ndarray, np.ndarray]:
    """(removable, seen in an activation) per component, from each non-constant value's
    ``(atoms, zero facts, dead facts)``: a channel goes when every slice of it is zero or dead
    and nothing pinned it. Constants are left out by the caller: they are sliced along with the
    activations they meet."""
    labels = components.labels
    blocked = components.pinned.copy()
    seen = np.zeros_like(blocked)  # a channel no activation carries (a kernel dim) is not one
    for dims, zeros, deads in values:
        for atoms, zero, dead in zip(dims, zeros, deads, strict=False):
            if atoms is not None:
                seen[labels[atoms]] = True
                blocked[labels[atoms[~(zero | dead)]]] = True
    return seen & ~blocked, seen


def distinct_dims(values: Iterable[Dims]) -> list[np.ndarray]:
    """Every non-empty static dimension's atoms, once per array (values that pass a dimension
    through unchanged, such as activations, share their input's array)."""
    seen: dict[int, np.ndarray] = {}
    for dims in values:
        for atoms in dims:
            if atoms is not None and atoms.size:
                seen.setdefault(id(atoms), atoms)
    return list(seen.values())


def keep_one_per_dim(
    dims: list[np.ndarray], labels: np.ndarray, remove: np.ndarray, scores: np.ndarray | None = None
) -> None:
    """Never empty a dimension: where every channel of one would go, keep one (the best-scoring).

    Keeping a channel only turns ``remove`` entries off, so it never empties another dimension
    and a dimension once fixed stays fixed: one pass over the distinct dimensions is enough.
    """
    for atoms in dims:
        comps = labels[atoms]
        if remove[comps].all():
            remove[comps[np.argmax(scores[comps])] if scores is not None else comps[0]] = False


def coupled_groups(
    dims: list[np.ndarray],
    carriers: Iterable[tuple[str, Atoms]],
    components: Components,
    removable: np.ndarray,
    seen: np.ndarray,
) -> list[ChannelGroup]:
    """Components that share a dimension form one group; groups are those some carrier (a
    ``constant:dim`` named in ``carriers`` with its atoms) holds."""
    labels = components.labels
    per_dim = [labels[atoms] for atoms in dims]
    rows = np.concatenate(per_dim) if per_dim else np.zeros(0, dtype=np.int64)
    cols = np.repeat([comps[0] for comps in per_dim], [comps.size for comps in per_dim]).astype(np.int64)
    n = components.count
    graph = coo_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=(n, n))
    _, set_of = connected_components(graph, directed=False)
    carrier_comps, carrier_names, names = _carriers(carriers, labels, seen)
    sets = np.unique(set_of[carrier_comps])
    members = _split_by(set_of, np.arange(n), sets)
    named = _split_by(set_of[carrier_comps], carrier_names, sets)
    groups = []
    for comps, name_ids in zip(members, named, strict=True):
        pinned = comps[components.pinned[comps]]
        groups.append(
            ChannelGroup(
                index=len(groups),
                components=comps,
                carriers=sorted(names[i] for i in np.unique(name_ids)),
                pinned_reason=components.reasons[int(pinned[0])] if pinned.size else None,
                prunable=comps[~components.pinned[comps]].astype(np.int64),
                removable=int(removable[comps].sum()),
            )
        )
    return groups


def _carriers(
    carriers: Iterable[tuple[str, Atoms]], labels: np.ndarray, seen: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(component, carrier name index) pairs for every carrier slice that holds a channel some
    activation also carries, and the carrier names."""
    index: dict[str, int] = {}
    comps_of, names_of = [], []
    for name, atoms in carriers:
        comps = labels[atoms]
        comps = comps[seen[comps]]
        if comps.size:
            position = index.setdefault(name, len(index))
            comps_of.append(comps)
            names_of.append(np.full(comps.size, position))
    if not comps_of:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), []
    return np.concatenate(comps_of), np.concatenate(names_of), list(index)


def _split_by(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> list[np.ndarray]:
    """For each key in ``wanted``, the ``values`` at its positions in ``keys``, in their order."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts, ends = np.searchsorted(ordered, wanted, "left"), np.searchsorted(ordered, wanted, "right")
    return [values[order[a:b]] for a, b in zip(starts, ends, strict=True)]
