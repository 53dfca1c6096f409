"""The table of op rules, keyed by ATen op (overload packet), and the rule for pointwise ops.

Each module of this package contributes a ``RULES`` table for the ops it understands
(``elementwise``, ``layers``, ``shape``, ...); a new module is picked up without editing this file.
An op missing from the tables gets the generic pointwise rule if ATen says it is pointwise
(:func:`.elementwise.is_pointwise`) and it produces one tensor; any other op is a barrier.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping

import torch
from torch.fx import Node

from .base import Barrier, OpRule
from .elementwise import POINTWISE, is_pointwise
from .shape import Getitem


def merge_tables(tables: Iterable[tuple[str, Mapping[object, OpRule]]]) -> dict[object, OpRule]:
    """One table from ``(module name, RULES)`` pairs. An op in two tables is an error naming both
    modules: merged silently, whichever module sorts later would override the other's rule."""
    merged: dict[object, OpRule] = {}
    owner: dict[object, str] = {}
    for name, table in tables:
        for op, rule in table.items():
            if op in merged:
                raise ValueError(f"{op} has a rule in both {owner[op]} and {name}: keep one")
            merged[op], owner[op] = rule, name
    return merged


def _module_tables() -> Iterable[tuple[str, Mapping[object, OpRule]]]:
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        yield module, getattr(importlib.import_module(f"{__name__}.{module}"), "RULES", {})


RULES: dict[object, OpRule] = merge_tables(_module_tables())

_BARRIER = Barrier()


def rule_for(node: Node) -> OpRule:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return RULES.get(target, _BARRIER)
    if target.overloadpacket in RULES:
        return RULES[target.overloadpacket]
    if isinstance(node.meta.get("val"), torch.Tensor) and is_pointwise(target):
        return POINTWISE
    return _BARRIER


__all__ = ["RULES", "Getitem", "OpRule", "merge_tables", "rule_for"]
