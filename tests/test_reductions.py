"""Reductions over channels (``rules/reductions.py``), issue 14.

A mean over channels (ConvNeXt-V2's global response normalisation) loses its zero channels and is
rewritten as a sum divided by the dense count; a channel that is dead downstream but nonzero is
still read by the mean and stays. Weights computed from weights (weight standardisation, as in
BiT / timm's ``StdConv2d``) strip along the output channels the statistics keep apart, never
along the input channels they are taken over.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_rules import strip_exact, zero_, zero_out
from torch import nn


class GRN(nn.Module):
    """Global response normalisation (ConvNeXt-V2), over dim ``channel`` of the input."""

    def __init__(self, width: int, channel: int) -> None:
        super().__init__()
        shape = [1, 1, 1, width] if channel == -1 else [1, width, 1, 1]
        self.channel = channel
        self.gamma = nn.Parameter(torch.randn(shape))
        self.beta = nn.Parameter(torch.randn(shape))

    def forward(self, x):
        spatial = (1, 2) if self.channel == -1 else (2, 3)
        gx = torch.norm(x, p=2, dim=spatial, keepdim=True)
        nx = gx / (gx.mean(dim=self.channel, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class GRNBlock(nn.Module):
    """conv -> GELU -> GRN -> conv, channels last (``Linear``) or first (1x1 ``Conv2d``)."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        self.last = channels_last
        layer = nn.Linear if channels_last else (lambda i, o: nn.Conv2d(i, o, 1))
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.pw1 = layer(6, 8)
        self.grn = GRN(8, -1 if channels_last else 1)
        self.pw2 = layer(8, 4)

    def forward(self, x):
        x = self.stem(x)
        if self.last:
            x = x.permute(0, 2, 3, 1)
        x = self.pw2(self.grn(F.gelu(self.pw1(x))))
        return x.permute(0, 3, 1, 2) if self.last else x


def grn_block(channels_last: bool) -> GRNBlock:
    torch.manual_seed(0)
    model = GRNBlock(channels_last)
    zero_out(model.pw1, [1, 5])
    zero_(model.grn.beta.view(-1), [1, 5])
    return model


def pw2_input_columns(shapes) -> int:
    return shapes["pw2.weight"][1]


@pytest.mark.parametrize("channels_last", [True, False])
def test_mean_over_channels_loses_zero_channels_as_a_sum_over_the_dense_count(channels_last):
    stripped, shapes, summary = strip_exact(grn_block(channels_last), torch.randn(2, 3, 5, 5))
    assert summary.channels_removed == 2
    assert shapes["pw1.weight"][0] == 6 and pw2_input_columns(shapes) == 6
    assert shapes["grn.gamma"] == ((1, 1, 1, 6) if channels_last else (1, 6, 1, 1))
    targets = [n.target for n in stripped.graph.nodes]
    assert torch.ops.aten.mean.dim not in targets and torch.ops.aten.sum.dim_IntList in targets
    divisors = [n.args[1] for n in stripped.graph.nodes if n.target == torch.ops.aten.div.Tensor]
    assert 8 in divisors  # the dense width, not the 6 channels left


def test_a_dead_but_nonzero_channel_is_still_read_by_the_mean():
    model = grn_block(channels_last=True)
    zero_(model.pw2.weight[:, 3], slice(None))  # nobody downstream reads channel 3 ...
    _, shapes, summary = strip_exact(model, torch.randn(2, 3, 5, 5))
    assert summary.channels_removed == 2  # ... but the mean over channels does: it stays
    assert pw2_input_columns(shapes) == 6


class ChannelSum(nn.Module):
    def __init__(self, reduce: str) -> None:
        super().__init__()
        self.reduce = reduce
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.b(y) * getattr(y, self.reduce)(dim=1, keepdim=True)


@pytest.mark.parametrize(("reduce", "removed"), [("sum", 2), ("mean", 2), ("amax", 0), ("std", 0)])
def test_zero_channels_leave_sums_and_means_but_not_maxima_or_deviations(reduce, removed):
    model = ChannelSum(reduce)
    zero_out(model.a, [2, 6])
    _, shapes, summary = strip_exact(model, torch.randn(2, 3, 4, 4))
    assert summary.channels_removed == removed and shapes["a.weight"][0] == 8 - removed
    if not removed:
        assert any(f"reduced by aten.{reduce}" in r for r in summary.barriers)


# -- weight standardisation ---------------------------------------------------------------------


class StdConv(nn.Conv2d):
    """A weight-standardised convolution in the three ways it is written in the wild."""

    def __init__(self, *args, style: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.style = style

    def standardised(self) -> torch.Tensor:
        w = self.weight
        if self.style == "mean_std":
            return (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        if self.style == "var_mean":  # BiT
            var, mean = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
            return (w - mean) / torch.sqrt(var + 1e-10)
        # timm's StdConv2d
        flat = F.batch_norm(w.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-6)
        return flat.reshape_as(w)

    def forward(self, x):
        return F.conv2d(x, self.standardised(), self.bias, self.stride, self.padding)


class StdNet(nn.Module):
    def __init__(self, style: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.std = StdConv(6, 8, 3, padding=1, style=style)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.std(F.relu(self.stem(x)))))


@pytest.mark.parametrize("style", ["mean_std", "var_mean", "batch_norm"])
def test_weight_standardised_conv_is_folded_then_loses_zero_channels_on_both_sides(style):
    """The standardised weight is computed from parameters alone, so strip folds it into a constant
    first (passes/fold.py): its zero rows go (standardising a zero row keeps it zero), and so does
    the zero input channel, whose column of the *folded* weight can be dropped without changing
    any statistic (unfolded, the column would change the row statistics: tests/test_constant_folding.py)."""
    torch.manual_seed(0)
    model = StdNet(style)
    zero_out(model.std, [2, 6])
    zero_out(model.stem, [1])
    _, shapes, summary = strip_exact(model, torch.randn(2, 3, 5, 5))
    assert summary.channels_removed == 3
    assert shapes["std.weight_folded"] == (6, 5, 3, 3) and shapes["std.bias"] == (6,) and shapes["head.weight"][1] == 6
    assert shapes["stem.weight"][0] == 5 and "std.weight" not in shapes
