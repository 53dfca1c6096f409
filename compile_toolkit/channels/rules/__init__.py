"""The table of op rules, keyed by ATen op (overload packet). An op missing here is a barrier.

Each module of this package contributes a ``RULES`` table for the ops it understands
(``elementwise``, ``layers``, ``shape``, ...); a new module is picked up without editing this file.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch
from torch.fx import Node

from .base import Barrier, OpRule
from .shape import Getitem

RULES: dict[object, OpRule] = {}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    RULES.update(getattr(importlib.import_module(f"{__name__}.{_module}"), "RULES", {}))

_BARRIER = Barrier()


def rule_for(node: Node) -> OpRule:
    target = node.target
    packet = target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target
    return RULES.get(packet, _BARRIER)


__all__ = ["RULES", "Getitem", "OpRule", "rule_for"]
