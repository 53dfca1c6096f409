"""The table of op rules, keyed by ATen op (overload packet), and the rule for pointwise ops.

Each module of this package contributes a ``RULES`` table for the ops it understands
(``elementwise``, ``layers``, ``shape``, ...); a new module is picked up without editing this file.
An op missing from the tables gets the generic pointwise rule if ATen says it is pointwise
(:func:`.elementwise.is_pointwise`) and it produces one tensor; any other op is a barrier.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch
from torch.fx import Node

from .base import Barrier, OpRule
from .elementwise import POINTWISE, is_pointwise
from .shape import Getitem

RULES: dict[object, OpRule] = {}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    RULES.update(getattr(importlib.import_module(f"{__name__}.{_module}"), "RULES", {}))

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


__all__ = ["RULES", "Getitem", "OpRule", "rule_for"]
