"""In-place writes that other nodes would see, found from ATen's alias annotations.

The analysis reads a graph as values, each computed once. ``torch.export`` keeps in-place ops
(``relu_``, ``add_``, ``x[:, 1:3].add_(1)``), and an in-place op reads as such a value only
while no node reads the memory it wrote other than through its result: ``relu_(conv(x))``, where
only the relu reads the conv's output, is fine; ``y[:, 1:3].add_(1)`` then ``conv(y)`` is not,
since the conv reads ``y`` as the add left it while the analysis would give it ``y``'s facts
from before. Such writes are barriers. ``zero_`` never is: writing zeros only makes "zero" facts
truer, and the analysis never counts on a value being non-zero.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

SAFE_WRITES = {torch.ops.aten.zero_}


def shared_writes(graph: Graph) -> dict[Node, Node]:
    """In-place op -> a node that reads memory it wrote, after it, not through its result."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    found: dict[Node, Node] = {}
    for node in graph.nodes:
        if node.op != "call_function" or getattr(node.target, "overloadpacket", None) in SAFE_WRITES:
            continue
        for written in _written(node):
            reader = _late_reader(written, node, order)
            if reader is not None:
                found[node] = reader
                break
    return found


def written_roots(graph: Graph) -> set[Node]:
    """Every node whose memory an in-place op writes, through any chain of views: the base of
    each alias chain an in-place op writes into (a ``get_attr`` when it writes a parameter or
    buffer). Constant folding must not read such a node as the value it had when computed."""
    roots: set[Node] = set()
    for node in graph.nodes:
        for written in _written(node):
            while (parent := _alias_parent(written)) is not None:
                written = parent
            roots.add(written)
    return roots


def _schema(node: Node) -> torch.FunctionSchema | None:
    target = node.target
    return target._schema if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) else None


def _written(node: Node) -> list[Node]:
    """The inputs an in-place op writes (schema arguments annotated ``Tensor(a!)``)."""
    schema = _schema(node)
    if schema is None or not schema.is_mutable:
        return []
    return [arg for arg, spec in zip(node.args, schema.arguments, strict=False)
            if isinstance(arg, Node) and spec.alias_info is not None and spec.alias_info.is_write]


def _alias_parent(node: Node) -> Node | None:
    """The node whose memory ``node``'s result shares: a view's input (``slice``, ``view``,
    ``transpose``, an output of ``split``), an in-place op's written input; else None."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        parent = node.args[0]
        return parent if isinstance(parent, Node) and _alias_parent(parent) is not None else None
    schema = _schema(node)
    if schema is None or not schema.arguments or not node.args or not isinstance(node.args[0], Node):
        return None
    aliased = schema.arguments[0].alias_info is not None and any(r.alias_info is not None for r in schema.returns)
    return node.args[0] if aliased else None


def _late_reader(written: Node, writer: Node, order: dict[Node, int]) -> Node | None:
    """A node after ``writer`` that reads ``written``'s memory through another alias than the
    writer's result (readers of the result see the write, as the analysis assumes)."""
    root = written
    while (parent := _alias_parent(root)) is not None:
        root = parent
    stack, seen = [root], set()
    while stack:
        alias = stack.pop()
        if alias in seen:
            continue
        seen.add(alias)
        for user in alias.users:
            if user is writer:
                continue
            same_memory = _alias_parent(user) is alias
            if same_memory and not _written(user):
                stack.append(user)  # a view: another name for the memory, follow its readers
            elif order[user] > order[writer]:
                return user  # reads or writes the memory after the write
            elif same_memory:
                stack.append(user)  # an earlier in-place op: its result is the same memory
    return None
