"""Pointwise ops are covered from ATen's own knowledge, not a list (issue 14).

Activations with no rule of their own (``rules.RULES`` has no entry) strip through the generic
pointwise rule: one that maps 0 to 0 lets zero channels go, one that does not (``softplus``,
``sigmoid``) keeps them but still lets dead channels go. Some of these ops lack ATen's pointwise
tag (``leaky_relu``, ``hardswish``, ``hardswish_``); they are found from their decomposition or
their functional counterpart.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_rules import strip_exact, zero_, zero_out
from torch import nn

from compile_toolkit.channels.rules import RULES
from compile_toolkit.channels.rules.elementwise import is_pointwise

aten = torch.ops.aten

KEEP_ZERO = {
    "mish": (F.mish, aten.mish),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.2), aten.leaky_relu),
    "hardswish_": (lambda x: F.hardswish(x, inplace=True), aten.hardswish_),
    "celu": (lambda x: F.celu(x, 0.7), aten.celu),
    "selu": (F.selu, aten.selu),
    "hardshrink": (F.hardshrink, aten.hardshrink),
    "where": (lambda x: torch.where(x > 0, x, 0.3 * x), aten.where),
}
NOT_ZERO = {
    "softplus": (F.softplus, aten.softplus),
    "sigmoid": (torch.sigmoid, aten.sigmoid),
    "hardsigmoid": (F.hardsigmoid, aten.hardsigmoid),
    "add_one": (lambda x: x + 1, aten.add),
}


class Act(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.act = act
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def stripped(act):
    torch.manual_seed(0)
    model = Act(act)
    zero_out(model.a, [1, 5])  # zero channels
    zero_(model.b.weight[:, 3], slice(None))  # channel 3 is dead (no consumer reads it)
    return strip_exact(model, torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("name", KEEP_ZERO)
def test_activation_without_a_rule_that_keeps_zero_strips_zero_and_dead_channels(name):
    act, op = KEEP_ZERO[name]
    assert op not in RULES
    _, shapes, summary = stripped(act)
    assert summary.channels_removed == 3
    assert shapes["a.weight"][0] == 5 and shapes["b.weight"][1] == 5
    assert not [r for r in summary.barriers if "no channel rule" in r or "failed" in r]


@pytest.mark.parametrize("name", NOT_ZERO)
def test_activation_that_does_not_keep_zero_lets_only_dead_channels_go(name):
    act, _ = NOT_ZERO[name]
    _, shapes, summary = stripped(act)
    assert summary.channels_removed == 1  # f(0) != 0: the zero channels feed b
    assert shapes["a.weight"][0] == 7 and shapes["b.weight"][1] == 7


def test_pointwise_is_found_where_the_tag_is_missing_and_not_for_other_ops():
    untagged = [aten.leaky_relu.default, aten.leaky_relu_.default, aten.hardswish.default, aten.hardswish_.default]
    assert not any(torch.Tag.pointwise in op.tags for op in untagged)
    assert all(is_pointwise(op) for op in untagged)
    not_pointwise = [aten.cumsum.default, aten.softmax.int, aten.bernoulli.p, aten.native_dropout.default,
                     aten.fill.Scalar, aten.sum.dim_IntList, aten.index_select.default]
    assert not any(is_pointwise(op) for op in not_pointwise)


class Cumsum(nn.Module):
    def __init__(self, cumulative: bool = True) -> None:
        super().__init__()
        self.cumulative = cumulative
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.cumsum(y, dim=1) if self.cumulative else torch.square(y))


def test_an_op_that_is_not_pointwise_stays_a_named_barrier():
    model = Cumsum()
    zero_out(model.a, [1, 5])
    _, shapes, summary = strip_exact(model, torch.randn(2, 3, 5, 5))
    assert summary.channels_removed == 0 and shapes["a.weight"][0] == 8
    assert any("no channel rule for aten.cumsum" in r for r in summary.barriers)
    control = Cumsum(cumulative=False)  # positive control: a pointwise op in its place lets both channels go
    zero_out(control.a, [1, 5])
    assert strip_exact(control, torch.randn(2, 3, 5, 5))[1]["a.weight"][0] == 6
