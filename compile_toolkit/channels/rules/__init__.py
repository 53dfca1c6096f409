"""The table of op rules, keyed by ATen op (overload packet). An op missing here is a barrier."""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from .base import Barrier, OpRule
from .elementwise import Binary, Unary
from .layers import BatchNorm, Conv, Linear
from .shape import Cat, Getitem, Pool, Reduce, Reshape

aten = torch.ops.aten

RULES: dict[object, OpRule] = {
    operator.getitem: Getitem(),
    # layers
    **{op: Conv() for op in (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)},
    aten.linear: Linear(),
    aten.batch_norm: BatchNorm(),
    # pointwise
    **{
        op: Unary(keeps_zero=True)
        for op in (
            aten.relu, aten.relu_, aten.gelu, aten.silu, aten.silu_, aten.tanh, aten.hardtanh,
            aten.hardtanh_, aten.hardswish, aten.hardswish_, aten.leaky_relu, aten.elu, aten.neg,
            aten.dropout, aten.clone, aten.contiguous, aten.alias, aten.detach,
        )
    },
    **{op: Unary(keeps_zero=False) for op in (aten.sigmoid, aten.hardsigmoid, aten.exp)},
    **{op: Binary("add") for op in (aten.add, aten.add_, aten.sub, aten.sub_)},
    **{op: Binary("mul") for op in (aten.mul, aten.mul_)},
    aten.div: Binary("div"),
    # layout
    aten.cat: Cat(),
    aten.view: Reshape(size_arg=1),
    aten.reshape: Reshape(size_arg=1),
    aten._unsafe_view: Reshape(size_arg=1),
    aten.unflatten: Reshape(size_arg=2),
    **{op: Reshape() for op in (aten.flatten, aten.squeeze, aten.unsqueeze)},
    # pooling and reductions
    **{op: Pool(spatial=1) for op in (aten.adaptive_avg_pool1d, aten.avg_pool1d, aten.max_pool1d)},
    **{op: Pool(spatial=2) for op in (aten.adaptive_avg_pool2d, aten.avg_pool2d, aten.max_pool2d)},
    **{op: Pool(spatial=3) for op in (aten.adaptive_avg_pool3d, aten.avg_pool3d, aten.max_pool3d)},
    **{op: Reduce() for op in (aten.mean, aten.sum, aten.amax)},
}

_BARRIER = Barrier()


def rule_for(node: Node) -> OpRule:
    target = node.target
    packet = target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target
    return RULES.get(packet, _BARRIER)
