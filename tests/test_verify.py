"""The verifier: NaN and infinity are errors where the reference has numbers, never a silent 0."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.capture import capture
from compile_toolkit.errors import CtkError, VerificationError
from compile_toolkit.exporters import export
from compile_toolkit.passes.base import GraphPass, PassResult
from compile_toolkit.passes.manager import PassManager
from compile_toolkit.passes.verify import relative_error, sample_inputs

NAN, INF = float("nan"), float("inf")


def _error(reference: list[float], candidate: list[float]) -> float:
    return relative_error([[torch.tensor(reference)]], [[torch.tensor(candidate)]])


@pytest.mark.parametrize("reference, candidate, expected", [
    ([1.0, 2.0], [1.0, 2.0], 0.0),
    ([1.0, 2.0], [1.0, 2.2], 0.1),
    ([1.0, 2.0], [1.0, NAN], INF),  # was 0.0: max(0.0, nan) keeps 0.0
    ([1.0, 2.0], [NAN, NAN], INF),
    ([1.0, 2.0], [1.0, INF], INF),
    ([1.0, INF], [1.0, -INF], INF),
    ([1.0, INF], [1.0, 5.0], INF),
    ([1.0, NAN], [1.0, 3.0], INF),  # a different pattern of NaN
    ([1.0, NAN], [1.0, NAN], 0.0),  # the same pattern: equal
    ([4.0, -INF], [4.0, -INF], 0.0),
])
def test_relative_error_treats_non_finite_values_exactly(reference, candidate, expected):
    got = _error(reference, candidate)
    assert got == pytest.approx(expected, rel=1e-6) if math.isfinite(expected) else got == expected


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class PoisonOneWeight(GraphPass):
    """A broken pass: one weight becomes NaN (or ``value``), as a bad rewrite could leave it."""

    name = "poison"

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self, gm):
        with torch.no_grad():
            gm.b.weight[0, 0] = self.value
        return PassResult(gm, True)


@pytest.mark.parametrize("value", [NAN, INF])
def test_pass_manager_rejects_a_pass_that_makes_outputs_non_finite(value):
    model, x = Net().eval(), torch.randn(4, 6)
    gm = capture(model, (x,)).program.module()
    with pytest.raises(VerificationError, match="'poison'.*inf"):
        PassManager([PoisonOneWeight(value)], sample_inputs((x,))).run(gm)


def test_pass_manager_accepts_a_pass_that_changes_nothing_numerically():
    """Positive control: the same harmless-looking edit with the value the weight already has."""
    model, x = Net().eval(), torch.randn(4, 6)
    gm = capture(model, (x,)).program.module()
    _, results = PassManager([PoisonOneWeight(model.b.weight[0, 0].item())], sample_inputs((x,))).run(gm)
    assert results[0].details["max_relative_error"] == 0.0


def test_strip_refuses_a_model_with_nan_weights():
    model, x = Net().eval(), torch.randn(4, 6)
    with torch.no_grad():
        model.a.weight[2] = 0.0  # a channel to strip, so the strip would have work to do
        model.b.weight[1, 3] = NAN
    with pytest.raises(CtkError, match="outputs NaN on check input 0.*NaN or infinite weights"):
        ctk.strip(model, (x,))


def test_export_refuses_a_reference_that_outputs_nan(tmp_path):
    model, x = Net().eval(), torch.randn(4, 6)
    with torch.no_grad():
        model.a.bias[0] = NAN
    with pytest.raises(CtkError, match="outputs NaN"):
        export(model, (x,), str(tmp_path / "out"), formats=("onnx",))
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
