"""Constant folding: a weight computed from parameters alone (timm's ScaledStdConv2d) becomes a
plain constant before the strip analysis, so pruning's zeros strip; nothing computed from an
input is ever folded, and nothing is folded where the analysis already follows the parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_error
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.capture import capture
from compile_toolkit.passes.fold import ConstantFolding
from compile_toolkit.passes.strip import StripPass
from compile_toolkit.pruning.folded import folded_carriers


class StdConv(nn.Conv2d):
    """timm's ScaledStdConv2d in plain torch: the weight standardised over ``in * kh * kw`` by
    ``F.batch_norm`` in training mode, scaled by a per-output-channel gain."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(cin, cout, k, padding=k // 2)
        self.gain = nn.Parameter(torch.empty(cout, 1, 1, 1).uniform_(0.5, 1.5))
        self.scale = (cin * k * k) ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class StdNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = StdConv(3, 16, 3), StdConv(16, 16, 3), StdConv(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c3(F.relu(self.c2(F.relu(self.c1(x)))))
        return self.fc(F.relu(x).mean((2, 3)))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_standardised_weights_strip_once_folded():
    model, x = StdNet().eval(), torch.randn(2, 3, 12, 12)
    report = ctk.prune(model, (x,), sparsity=0.5)
    assert report.pruned == 8 + 8 + 4
    # pruning zeros whole rows (and gains): zeroed input columns would shift a row's standardisation
    for name in ("c1.weight", "c2.weight", "c3.weight"):
        rows = report.masks[name].flatten(1)
        assert bool((rows.all(1) | ~rows.any(1)).all()), name
    assert {"c1.gain", "c2.gain", "c3.gain"} <= set(report.masks)

    # positive control: without folding, the statistics over in * kh * kw pin every channel a
    # standardised weight reads; only c3's outputs (read by the plain linear layer) strip
    unfolded = StripPass()(capture(model, (x,)).program.module())
    assert unfolded.details.channels_removed == 4
    assert any("statistics of aten.batch_norm" in reason for reason in unfolded.details.barriers)

    stripped = ctk.strip(model, (x,))
    assert ctk.strip_summary(stripped).channels_removed == report.pruned
    assert n_params(stripped) < n_params(model) * 0.5
    assert "c1.gain" not in dict(stripped.named_parameters())  # read only by the fold: deleted
    with torch.no_grad():
        for batch in (x, torch.randn(3, 3, 12, 12)):
            assert rel_error(model(batch), stripped(batch)) < 1e-5


def test_folded_constant_is_carried_by_rows_and_gains_not_columns():
    gm = capture(StdNet().eval(), (torch.randn(1, 3, 6, 6),)).program.module()
    folds = ConstantFolding()(gm).details
    assert sorted(folds) == ["c1.weight_folded", "c2.weight_folded", "c3.weight_folded"]
    found = folded_carriers(folds["c2.weight_folded"], gm.get_parameter("c2.weight_folded"))
    assert found == [("c2.weight", 0, 0), ("c2.gain", 0, 0)]


class ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_nothing_computed_from_an_input_is_folded():
    model = ConvBn().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
    gm = capture(model, (torch.randn(2, 3, 8, 8),)).program.module()
    nodes = len(gm.graph.nodes)
    result = ConstantFolding()(gm)
    assert not result.modified and result.details == {}
    assert len(gm.graph.nodes) == nodes


class MaskedLinear(nn.Module):
    """``weight * mask``: parameter-only, but the analysis follows it exactly (zero rows stay
    zero), so folding would only lose the model's own parameterisation."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("mask", (torch.arange(8) % 2).float()[:, None].expand(8, 6).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(F.linear(x, self.a.weight * self.mask, self.a.bias * self.mask[:, 0])))


def test_parameter_only_subgraphs_that_pin_nothing_stay():
    model, x = MaskedLinear().eval(), torch.randn(4, 6)
    gm = capture(model, (x,)).program.module()
    assert not ConstantFolding()(gm).modified
    stripped = ctk.strip(model, (x,))
    assert ctk.strip_summary(stripped).channels_removed == 4
    assert {"a.weight", "mask"} <= {*dict(stripped.named_parameters()), *dict(stripped.named_buffers())}
    assert rel_error(model(x), stripped(x)) < 1e-5


def test_nf_resnet26_prunes_and_strips():
    timm = pytest.importorskip("timm")
    model = timm.create_model("nf_resnet26").eval()
    with torch.no_grad():  # as trained: timm starts each block's last gain at 0 (its branch dead)
        for name, param in model.named_parameters():
            if name.endswith("gain"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    x = torch.randn(2, 3, 64, 64)
    before = n_params(model)
    report = ctk.prune(model, (x,), sparsity=0.5)
    assert report.pruned > 0
    stripped = ctk.strip(model, (x,))
    assert ctk.strip_summary(stripped).channels_removed >= report.pruned
    assert n_params(stripped) < before / 3
    with torch.no_grad():
        batch = torch.randn(2, 3, 64, 64)
        assert rel_error(model(batch), stripped(batch)) < 1e-5
