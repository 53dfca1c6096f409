"""The table of ONNX op rules, keyed by op type for the default domain and by ``(domain, op
type)`` for ONNX Runtime's ``com.microsoft`` ops.

Each module of this package contributes a ``RULES`` table (``elementwise``, ``layers``,
``layout``, ``reshape``, ``pooling``; ``contrib`` and ``fused_attention`` for ONNX Runtime's
fused ops); a new module is picked up without editing this file, and an op in two tables is an error
(:func:`compile_toolkit.channels.rules.merge_tables`, shared with the ATen rules). An op missing
from the tables, an op of any other domain (a model-local function) and any node holding a
subgraph (``If``, ``Loop``, ``Scan``) is a barrier named in the report. ONNX Runtime's fused
attention ops without a rule (:data:`FUSED_ATTENTION`: ``GroupQueryAttention``, the packed and
decoder forms) are barriers whose reason says what a user can do: strip the file before
``onnxruntime.transformers.optimizer`` fuses its attention.
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

# What onnxruntime.transformers.optimizer writes for the attention of a BERT, GPT or Llama export
# that no rule reads (``Attention`` and ``MultiHeadAttention`` have theirs, in ``fused_attention``):
# the heads live inside the op, with a key/value cache or packed sequences.
FUSED_ATTENTION = ("GroupQueryAttention", "PackedAttention", "PackedMultiHeadAttention",
                   "DecoderMaskedMultiHeadAttention", "DecoderMaskedSelfAttention", "SparseAttention")


class FusedAttention(Barrier):
    """A barrier that names ONNX Runtime's fused attention and the way around it."""

    def why(self, node: ir.Node) -> str:
        return (f"ONNX Runtime's fused attention com.microsoft::{node.op_type} at node {node.name or '(unnamed)'} "
                f"has no channel rule: its heads are kept (strip the exported file before "
                f"onnxruntime.transformers.optimizer fuses it)")


_FUSED = FusedAttention()


def rule_for(node: ir.Node) -> OnnxRule:
    """The node's rule: a ``com.microsoft`` op by ``(domain, op type)``, a default-domain op by op
    type; a barrier for anything else."""
    if has_subgraph(node):
        return _BARRIER
    if node.domain == "com.microsoft":
        return RULES.get((node.domain, node.op_type), _FUSED if node.op_type in FUSED_ATTENTION else _BARRIER)
    if node.domain not in ("", "ai.onnx"):
        return _BARRIER
    return RULES.get(node.op_type, _BARRIER)


def has_subgraph(node: ir.Node) -> bool:
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values())


__all__ = ["FUSED_ATTENTION", "RULES", "Barrier", "Failed", "FusedAttention", "OnnxRule", "ShapeChange", "has_subgraph",
           "rule_for"]
