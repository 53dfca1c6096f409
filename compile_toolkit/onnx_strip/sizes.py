"""Values computed from the sizes of dims: the ``Shape`` -> ``Gather`` -> ``Concat`` chains that
``torch.onnx`` writes for ``x.view(x.size(0), -1)``, ``torch.chunk`` and reshapes with a dynamic
batch.

A ``Shape`` node reads no element, only sizes; what matters is where those sizes go. The walk
follows them (:class:`~.context.Sizes`): every entry of a chain's value knows its number (unless
it is a symbolic dim's size) and which dims' sizes it was computed from. Ops that only move
entries (``Gather``, ``Slice``, ``Concat``, ``Unsqueeze``, ...) and elementwise arithmetic on
them are run in ONNX Runtime on the entries, so the chain is followed the way the runtime
computes it. Where a chain's value is read by anything else, the dims it was computed from are
pinned (their sizes must not change), unless the reader's rule says it follows them itself
(``OnnxRule.sizes_read``: a ``Reshape`` whose target entry is the size of the very dim it keeps).
A value whose entries are all known is a constant to the rules that read it (a slice bound).

After a strip, :func:`resized` runs a chain again on the kept sizes, so that a rule whose
constant cannot be rewritten (a ``Reshape`` target with a dynamic batch in it) can check that
every entry it let follow its dims comes out as the size the strip gives that dim.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce

import numpy as np
import onnx_ir as ir

from .context import Key, OnnxContext, Shape, Sizes, shape_read
from .evaluate import run_alone

MOVES = {"Gather", "Slice", "Squeeze", "Unsqueeze", "Reshape", "Identity", "Flatten", "Expand", "Tile", "Transpose",
         "Concat"}  # each output entry is one entry of the moved inputs
ARITHMETIC = {"Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Neg", "Abs", "Floor", "Ceil", "Cast",
              "Equal", "Where"}  # elementwise (``Where(Equal(s, -1), 1, s)``: how TorchScript's expand reads sizes)
LARGEST = 64  # entries: a larger value is a tensor, not a shape


def track(ctx: OnnxContext, node: ir.Node) -> bool:
    """Record the sizes a node's outputs hold, if it reads sizes (``Shape``) or moves or
    computes them from other sizes and constants; ``False`` where it does neither."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Shape" and ctx.present(node, 0) and ctx.key(node, 0) in ctx.shapes:
        ctx.sizes[node.outputs[0]] = _shape_sizes(ctx, node)
        return True
    if node.op_type == "ConstantOfShape":
        outputs = _filled(ctx, node)
    else:
        operands = _operands(ctx, node)
        if operands is None:
            return False
        outputs = _moved(ctx, node, operands) if node.op_type in MOVES else _computed(ctx, node, operands)
    if outputs is None:
        return False
    ctx.sizes.update(zip(node.outputs, outputs, strict=True))
    return True


def pin_sources(ctx: OnnxContext, sizes: Sizes, reason: str, free: set[int] = frozenset()) -> None:
    """Pin the dims whose sizes ``sizes`` was computed from, except those of the entries in
    ``free`` (positions in the flattened value)."""
    for position, sources in enumerate(sizes.sources.ravel()):
        if position not in free:
            for key, dim in sources:
                ctx.pin(ctx.atoms[key][dim], reason)


def resized(ctx: OnnxContext, value: ir.Value, shape_of: Callable[[Key], Shape],
            memo: dict[ir.Value, np.ndarray | None] | None = None) -> np.ndarray | None:
    """The entries of ``value`` (computed from sizes: ``value in ctx.sizes``) once every dim
    has the size ``shape_of(key)`` gives it (the kept sizes after a strip), the chain run again
    node by node in ONNX Runtime, as :func:`track` ran it; a symbolic size is read as 1 (the
    entries it feeds are not known either way). ``None`` where a node of the chain cannot be run
    again. Constants the chain reads are read as they are."""
    memo = {} if memo is None else memo
    if value not in memo:
        memo[value] = _resized(ctx, value, shape_of, memo) if value in ctx.sizes else ctx.value_array(value)
    return memo[value]


def _resized(ctx: OnnxContext, value: ir.Value, shape_of: Callable[[Key], Shape],
             memo: dict[ir.Value, np.ndarray | None]) -> np.ndarray | None:
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Shape":
        shape = shape_of(ctx.key(node, 0))
        return np.array([1 if shape[d] is None else shape[d] for d in shape_read(node, len(shape))], dtype=np.int64)
    arrays = [None if v is None else resized(ctx, v, shape_of, memo) for v in node.inputs]
    if any(a is None and v is not None for a, v in zip(arrays, node.inputs, strict=True)) or arrays[0] is None:
        return None
    outputs = run_alone(ctx.opsets, [node], [arrays[1:]], arrays[0])
    return None if outputs is None else outputs[value.index()]


def _shape_sizes(ctx: OnnxContext, node: ir.Node) -> Sizes:
    """The sizes a ``Shape`` node reads. The length of a value that is itself computed from sizes
    (``ConstantOfShape(Shape(target))``: TorchScript's ``expand`` reads its target's length) is a
    rank, which no strip changes: read from no dim."""
    key = ctx.key(node, 0)
    shape = ctx.shapes[key]
    read = list(shape_read(node, len(shape)))
    sources = np.empty(len(read), dtype=object)
    rank_only = key in ctx.sizes
    sources[:] = [frozenset() if rank_only else frozenset({(key, d)}) for d in read]  # a symbolic dim: a name
    known = np.array([shape[d] is not None for d in read], dtype=bool)
    return Sizes(np.array([shape[d] or 0 for d in read], dtype=np.int64), known, sources)


def _operands(ctx: OnnxContext, node: ir.Node) -> list[Sizes | None] | None:
    """Each input as sizes (a constant: all known, from no dim; ``None`` where omitted), if the
    node moves or computes sizes: at least one input holds sizes, only inputs it moves or
    computes with do, and every other input is a small constant; else ``None``."""
    if node.op_type not in MOVES | ARITHMETIC or not any(v in ctx.sizes for v in node.inputs if v is not None):
        return None
    moved = range(len(node.inputs)) if node.op_type in ("Concat", *ARITHMETIC) else (0,)
    operands: list[Sizes | None] = []
    for i, value in enumerate(node.inputs):
        array = None if value is None else ctx.value_array(value)
        if value is None:
            operands.append(None)
        elif value in ctx.sizes:
            if i not in moved:  # sizes that say how to move others (an Expand's shape) are read, not moved
                return None
            operands.append(ctx.sizes[value])
        elif array is not None and array.size <= LARGEST:
            operands.append(Sizes.constant(array))
        else:
            return None
    return operands


def _moved(ctx: OnnxContext, node: ir.Node, operands: list[Sizes | None]) -> list[Sizes] | None:
    """Run the node on the positions of its moved inputs' entries (one numbering across all
    of ``Concat``'s inputs) to learn which entry each output entry is."""
    moved = range(len(operands)) if node.op_type == "Concat" else (0,)
    arrays, offset = [], 0
    for i, operand in enumerate(operands):
        if operand is None or i not in moved:
            arrays.append(None if operand is None else operand.values)
            continue
        size = operand.values.size
        arrays.append((offset + np.arange(size)).astype(operand.values.dtype).reshape(operand.values.shape))
        offset += size
    outputs = run_alone(ctx.opsets, [node], [arrays[1:]], arrays[0])
    if outputs is None or any(o.size > LARGEST for o in outputs):
        return None
    pool = [operands[i] for i in moved]
    whole = Sizes(*(np.concatenate([getattr(s, f).ravel() for s in pool]) for f in ("values", "known", "sources")))
    return [whole.taken(o.astype(np.int64)) for o in outputs]


def _filled(ctx: OnnxContext, node: ir.Node) -> list[Sizes] | None:
    """``ConstantOfShape`` of known sizes (the zero pads ``torch.onnx`` appends for the dims
    ``F.pad`` leaves alone): every entry is the fill value, known, and computed from all the
    sizes that gave the count (a different count is a different value)."""
    count = ctx.sizes.get(node.inputs[0])
    if count is None or not count.known.all():
        return None
    outputs = run_alone(ctx.opsets, [node], [[]], count.values)
    if outputs is None or outputs[0].size > LARGEST:
        return None
    sources = np.empty(outputs[0].shape, dtype=object)
    sources.fill(frozenset().union(*count.sources.ravel()))
    return [Sizes(outputs[0], np.ones(outputs[0].shape, dtype=bool), sources)]


def _computed(ctx: OnnxContext, node: ir.Node, operands: list[Sizes | None]) -> list[Sizes] | None:
    """Elementwise arithmetic: run on the entries' numbers; an entry is known where all its
    operands' entries are, and computed from all their dims."""
    present = [s for s in operands if s is not None]
    arrays = [None if s is None else np.where(s.known, s.values, np.ones_like(s.values)) for s in operands]
    outputs = run_alone(ctx.opsets, [node], [arrays[1:]], arrays[0])
    if outputs is None or outputs[0].size > LARGEST:
        return None
    known = np.logical_and.reduce(np.broadcast_arrays(*(s.known for s in present)))
    sources = reduce(np.frompyfunc(frozenset.union, 2, 1), [s.sources for s in present])
    shape = outputs[0].shape
    return [Sizes(outputs[0], np.broadcast_to(known, shape).copy(), np.broadcast_to(sources, shape).copy())]
