"""The table of ONNX op rules, keyed by op type of the default domain.

Each module of this package contributes a ``RULES`` table (``elementwise``, ``layers``,
``layout``, ``pooling``); a new module is picked up without editing this file, and an op type in
two tables is an error (:func:`compile_toolkit.channels.rules.merge_tables`, shared with the ATen
rules). An op missing from the tables, an op of another domain (``com.microsoft``, a model-local
function) and any node holding a subgraph (``If``, ``Loop``, ``Scan``) is a barrier.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping

import onnx_ir as ir

from ...channels.rules import merge_tables
from .base import Barrier, Failed, OnnxRule, ShapeChange


def _module_tables() -> Iterable[tuple[str, Mapping[object, OnnxRule]]]:
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        yield module, getattr(importlib.import_module(f"{__name__}.{module}"), "RULES", {})


RULES: dict[object, OnnxRule] = merge_tables(_module_tables())

_BARRIER = Barrier()


def rule_for(node: ir.Node) -> OnnxRule:
    if node.domain not in ("", "ai.onnx") or has_subgraph(node):
        return _BARRIER
    return RULES.get(node.op_type, _BARRIER)


def has_subgraph(node: ir.Node) -> bool:
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values())


__all__ = ["RULES", "Barrier", "Failed", "OnnxRule", "ShapeChange", "has_subgraph", "rule_for"]
