"""One copy per reader of a weight the graph dequantizes, for the analysis; merged back after.

The analysis gives every use of a constant its own atoms (``context.py``), because exporters
share one initializer between unrelated layers whenever their values are equal (``torch.onnx``
gives every fresh BatchNorm the same all-ones scale). A quantizer then dequantizes the shared
initializer once, and that ``DequantizeLinear`` output is a computed value with one set of
atoms: it would couple every layer that reads it. So before the analysis each
``DequantizeLinear`` of constants (and each ``Identity`` of such a value) gets one copy per
reader; after the strip, copies that read the very same (sliced) constants again are merged
back, so a graph whose readers all keep the same channels comes out as it went in.
"""

from __future__ import annotations

import onnx_ir as ir

from .context import leaf_constant

COPIED = ("DequantizeLinear", "Identity")


def unshare(graph: ir.Graph) -> dict[ir.Node, ir.Node]:
    """Give each reader of a copied node's output (beyond the first) its own copy of the node,
    from the last such node to the first; returns copy -> original."""
    constant = _constant_nodes(graph)
    copies: dict[ir.Node, ir.Node] = {}
    for node in reversed(list(graph)):
        if node not in constant or node.op_type not in COPIED or node.domain not in ("", "ai.onnx"):
            continue
        for k, use in enumerate(list(node.outputs[0].uses())[1:], start=1):
            copy = _copy(node, k)
            graph.insert_after(node, copy)
            use.node.replace_input_with(use.idx, copy.outputs[0])
            copies[copy] = node
    return copies


def merge_back(graph: ir.Graph, copies: dict[ir.Node, ir.Node]) -> None:
    """Merge each copy that reads what its original reads (in graph order, so an ``Identity``
    whose ``DequantizeLinear`` copies merged reads the same value again) into the original."""
    for node in list(graph):
        original = copies.get(node)
        if original is None or original.graph is not graph or list(node.inputs) != list(original.inputs):
            continue
        node.outputs[0].replace_all_uses_with(original.outputs[0])
        graph.remove(node, safe=True)


def _constant_nodes(graph: ir.Graph) -> set[ir.Node]:
    """Nodes of one output computed from constants alone (initializers, ``Constant`` nodes)."""
    found: set[ir.Node] = set()
    for node in graph:
        inputs = [v for v in node.inputs if v is not None]
        if len(node.outputs) == 1 and inputs and all(leaf_constant(v) is not None or v.producer() in found
                                                     for v in inputs):
            found.add(node)
    return found


def _copy(node: ir.Node, k: int) -> ir.Node:
    output = node.outputs[0]
    copy = ir.Node(node.domain, node.op_type, list(node.inputs),
                   attributes=[ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                   name=f"{node.name}_reader{k}", num_outputs=1)
    copy.outputs[0].name = f"{output.name}_reader{k}"
    copy.outputs[0].shape = output.shape
    copy.outputs[0].type = output.type
    return copy
