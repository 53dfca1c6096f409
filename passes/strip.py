"""The strip pass: remove channels the analysis proves dead or zero, exactly.

Every parameter, buffer and constant that carries a removed channel is sliced, and every shape
constant in the graph (view sizes and the like) is rewritten by its op's rule, so the result is
an ordinary, smaller graph with no gathers or masks left in it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule, Node

from compile_toolkit.channels.analysis import ChannelAnalysis, analyze, failed_rule
from compile_toolkit.channels.rules.base import Failed, ShapeChange

from .base import GraphPass, PassResult


class StripPass(GraphPass):
    name = "strip"

    def __call__(self, gm: GraphModule) -> PassResult:
        failed: dict[Node, Failed] = {}
        while True:  # a node whose rewrite raises is undone, made a barrier, and analysed again
            why = "strip: zero and dead channels" if not failed else f"strip again: {list(failed.values())[-1].reason}"
            analysis = analyze(gm, failed, why)
            removed = int(analysis.removable.sum())
            fault = _rewrite_shapes(gm, analysis) if removed else None
            if fault is None:
                break
            failed[fault.node] = fault.rule
        if removed:
            _slice_constants(gm, analysis)
            gm.recompile()
        return PassResult(gm, bool(removed), StripSummary.of(analysis))


@dataclass(frozen=True)
class StripGroup:
    """One coupled channel group: the parameters that carry it, its channels before and after,
    and the barrier that kept its channels (``None`` when nothing pinned them)."""

    carriers: list[str]
    channels: int
    kept: int
    kept_because: str | None


@dataclass(frozen=True)
class StripSummary:
    """What a strip removed and what kept the rest; ``max_relative_error`` is the stripped
    module's error against the original model, ``None`` until ``ctk.strip`` has measured it, and
    ``tolerance`` the relative error it was held to (more than asked only where the model's own
    float32 rounding is larger)."""

    channels_removed: int
    groups: list[StripGroup] = field(default_factory=list)
    barriers: list[str] = field(default_factory=list)
    max_relative_error: float | None = None
    tolerance: float | None = None

    @classmethod
    def of(cls, analysis: ChannelAnalysis) -> StripSummary:
        groups = [StripGroup(g.carriers, g.size, g.size - g.removable, g.pinned_reason) for g in analysis.groups]
        return cls(int(analysis.removable.sum()), groups, analysis.barriers)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form that reports (``report.json``) store."""
        return asdict(self)


def _slice_constants(gm: GraphModule, analysis: ChannelAnalysis) -> None:
    done: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in done or (node, None) not in analysis.ctx.atoms:
            continue
        done.add(node.target)
        value = analysis.ctx.values[node.target]
        cuts = {d: index for d, index in enumerate(analysis.keep((node, None)))
                if index is not None and len(index) != value.shape[d]}
        if cuts:
            _assign(gm, node.target, _select(value.detach(), cuts))


def _select(value: torch.Tensor, cuts: dict[int, np.ndarray]) -> torch.Tensor:
    """``value`` with only the given indices along the given dims: numpy's ``take`` where the
    dtype allows (on CPU about ten times faster than ``index_select``), else ``index_select``."""
    try:
        array = value.numpy()
    except (TypeError, RuntimeError):  # bfloat16 and other dtypes numpy lacks; not on the CPU
        for d, index in cuts.items():
            value = value.index_select(d, torch.as_tensor(index, dtype=torch.long, device=value.device))
        return value
    for d, index in cuts.items():
        array = np.take(array, index, axis=d)
    return torch.from_numpy(array)


def _assign(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    owner_name, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if name in owner._parameters:
        old = owner._parameters[name]
        owner._parameters[name] = nn.Parameter(value.detach().contiguous(), requires_grad=old.requires_grad)
    elif name in owner._buffers:
        owner._buffers[name] = value.contiguous()
    else:
        setattr(owner, name, value.contiguous())


@dataclass(frozen=True)
class _Fault:
    node: Node
    rule: Failed


def _rewrite_shapes(gm: GraphModule, analysis: ChannelAnalysis) -> _Fault | None:
    """Let each rule fix the shape constants around its node. If one raises, every edit is
    undone (targets and arguments restored, nodes the rules added erased) and the fault returned,
    so the graph is exactly as analysed."""
    ctx = analysis.ctx
    original = list(gm.graph.nodes)
    saved = {node: (node.target, node.args, node.kwargs) for node in original}
    for node in original:
        if node.op != "call_function" or node not in ctx.output_counts:
            continue
        keys = ctx.keys_of(node)
        old = [ctx.shapes[k] for k in keys]
        new = [analysis.kept_shape(k) for k in keys]
        inputs = [(arg, None) for arg in node.all_input_nodes if (arg, None) in ctx.shapes]
        if old != new or any(ctx.shapes[k] != analysis.kept_shape(k) for k in inputs):
            change = ShapeChange(old, new, lambda arg: analysis.keep((arg, None)))
            try:
                analysis.rules[node].rewrite(node, change)
            except Exception as error:  # noqa: BLE001 - a failed rewrite is a barrier, not a crash
                _restore(gm, saved)
                return _Fault(node, failed_rule(node, "rewriting shapes", error))
    return None


def _restore(gm: GraphModule, saved: dict[Node, tuple]) -> None:
    for node, (target, args, kwargs) in saved.items():
        node.target, node.args, node.kwargs = target, args, kwargs
    for node in reversed(list(gm.graph.nodes)):
        if node not in saved:
            gm.graph.erase_node(node)
