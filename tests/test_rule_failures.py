"""A rule that raises is a reported barrier, never a crash of ``ctk.strip`` (issue 14).

The model reads a per-channel table through an integer index buffer (Swin's relative position
bias), beside an independent branch. It strips as is; then the index op's rule is made to raise
in each step (couple/zero, dead, rewrite): the strip still verifies, the report names the op, the
node and the error, and the other branch's zero channels still go.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_rules import strip_exact, zero_, zero_out
from torch import nn

from compile_toolkit.channels import analysis as channel_analysis
from compile_toolkit.channels.rules import rule_for

ERROR = ".numpy() is not supported for tensor subclasses"


class BiasAndBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.table = nn.Parameter(torch.randn(5, 4))
        self.register_buffer("idx", torch.randint(0, 5, (3, 3)))
        self.b = nn.Conv2d(4, 2, 1)
        self.c = nn.Conv2d(3, 6, 1)
        self.d = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        biased = self.a(x) + self.table[self.idx].permute(2, 0, 1)
        return self.b(biased) + self.d(F.relu(self.c(x)))


def pruned() -> BiasAndBranch:
    torch.manual_seed(0)
    model = BiasAndBranch()
    zero_out(model.a, [2])
    zero_(model.table[:, 2], slice(None))  # channel 2 of the biased path is zero
    zero_out(model.c, [1, 4])  # two channels of the other branch
    return model


def raising(step: str, target=torch.ops.aten.index.Tensor):
    """``rule_for`` that gives ``target`` a copy of its rule whose ``step`` raises."""

    def choose(node):
        rule = rule_for(node)
        if node.target is not target:
            return rule
        broken = type(rule)()

        def fail(*args, **kwargs):
            raise RuntimeError(ERROR)

        setattr(broken, step, fail)
        return broken

    return choose


def test_integer_buffer_bias_table_strips():
    _, shapes, summary = strip_exact(pruned(), torch.randn(2, 3, 3, 3))
    assert summary.channels_removed == 3
    assert shapes["table"] == (5, 3) and shapes["a.weight"][0] == 3 and shapes["c.weight"][0] == 4


@pytest.mark.parametrize("step", ["couple", "zero", "dead"])
def test_a_rule_that_raises_is_a_reported_barrier(monkeypatch, step):
    monkeypatch.setattr(channel_analysis, "rule_for", raising(step))
    _, shapes, summary = strip_exact(pruned(), torch.randn(2, 3, 3, 3))
    assert summary.channels_removed == 2  # the table's channel stays, the branch's go
    assert shapes["table"] == (5, 4) and shapes["a.weight"][0] == 4 and shapes["c.weight"][0] == 4
    failed = [r for r in summary.barriers if "failed" in r]
    assert len(failed) == 1 and "aten.index at node index" in failed[0] and ERROR in failed[0]


def test_a_rewrite_that_raises_is_undone_and_reported(monkeypatch):
    monkeypatch.setattr(channel_analysis, "rule_for", raising("rewrite", torch.ops.aten.conv2d.default))
    _, shapes, summary = strip_exact(pruned(), torch.randn(2, 3, 3, 3))
    failed = [r for r in summary.barriers if "failed (rewriting shapes)" in r]
    assert failed and all("aten.conv2d" in r and ERROR in r for r in failed)
    assert summary.channels_removed == 0 and shapes["c.weight"][0] == 6
    monkeypatch.undo()  # positive control: the same model with working rules loses its zero channels
    assert strip_exact(pruned(), torch.randn(2, 3, 3, 3))[2].channels_removed == 3
