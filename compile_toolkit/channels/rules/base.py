"""The op-rule protocol and the barrier every op without a rule gets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch.fx import Node

from ..context import Context, DimFacts, Dims, describe, mask
from ..solve import RuleFailure

Shape = list[int | None]


@dataclass(frozen=True)
class ShapeChange:
    """What stripping did around one node: ``old``/``new`` shapes per output value, and
    ``kept_input(arg)``: the kept indices along each dim of an input (``None`` for a symbolic
    dim; the input's ``meta`` still describes it whole)."""

    old: list[Shape]
    new: list[Shape]
    kept_input: Callable[[Node], list[np.ndarray | None]]

    def new_input(self, arg: Node) -> Shape:
        return [None if k is None else len(k) for k in self.kept_input(arg)]


class OpRule:
    """How one ATen op moves channels: coupling, zero facts forward, dead facts backward.

    ``couple`` and ``zero`` return one entry per output value of the node (most ops have one).
    ``dead`` calls :meth:`Context.mark_dead` for the inputs it can say something about; inputs it
    leaves out are treated as fully used. ``rewrite`` fixes shape constants in the node's
    arguments after channels were removed around it (see :class:`ShapeChange`).
    """

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        raise NotImplementedError

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        return [ctx.no_facts(shape) for shape in output_shapes(ctx, node)]

    def dead(self, ctx: Context, node: Node) -> None:
        """Default: say nothing, so every input is treated as used."""

    def rewrite(self, node: Node, change: ShapeChange) -> None:
        """Default: the op has no shape constants."""


def output_shapes(ctx: Context, node: Node) -> list[list[int | None]]:
    count = ctx.output_counts[node]
    if count is None:
        return [ctx.shape(node)]
    return [ctx.shape(node, i) for i in range(count)]


class Barrier(OpRule):
    """An op without a rule: everything it touches is kept, and the report says which op did it
    (``reason``, by default "no channel rule for <op> at node <node>")."""

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        reason = self.reason or f"no channel rule for {describe(node)}"
        for arg in node.all_input_nodes:
            for key in ctx.keys_of(arg):
                ctx.pin_value(key[0], reason, key[1])
        return [[ctx.fresh(s, reason) for s in shape] for shape in output_shapes(ctx, node)]


class Failed(Barrier, RuleFailure):
    """The barrier that replaces a rule that raised (see ``analysis.failed_rule``): ``reason``
    names the op, the node and the error."""


def copy_facts(masks: DimFacts) -> DimFacts:
    return [None if m is None else m.copy() for m in masks]


def full(shape: list[int | None], fill: bool) -> DimFacts:
    return [mask(s, fill) for s in shape]


def normalize_dim(d: int, rank: int) -> int:
    """``d`` counted from the front (a negative dim counts from the back)."""
    return d + rank if d < 0 else d


def argument(node: Node, name: str, default=None):
    """An ATen op's argument by schema name, whether passed by position, by keyword or defaulted
    (``default`` if the op has no such argument or no default for it)."""
    if name in node.kwargs:
        return node.kwargs[name]
    for i, arg in enumerate(node.target._schema.arguments):
        if arg.name == name:
            if i < len(node.args):
                return node.args[i]
            return arg.default_value if arg.has_default_value() else default
    return default


def set_argument(node: Node, name: str, value) -> None:
    """Set an ATen op's argument by schema name, keeping how it was passed."""
    schema = node.target._schema.arguments
    position = next(i for i, a in enumerate(schema) if a.name == name)
    if position >= len(node.args):
        node.update_kwarg(name, value)
        return
    args = list(node.args)
    args[position] = value
    node.args = tuple(args)
