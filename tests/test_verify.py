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
        PassManager([PoisonOneWeight(value)], sample_inputs((x,)))(gm)


def test_pass_manager_accepts_a_pass_that_changes_nothing_numerically():
    """Positive control: the same harmless-looking edit with the value the weight already has."""
    model, x = Net().eval(), torch.randn(4, 6)
    gm = capture(model, (x,)).program.module()
    result = PassManager([PoisonOneWeight(model.b.weight[0, 0].item())], sample_inputs((x,)))(gm)
    assert result.details["poison"].max_relative_error == 0.0


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


class Unchanged(GraphPass):
    """A pass that looks at the graph and changes nothing (``in_place`` as given)."""

    def __init__(self, name: str, in_place: bool) -> None:
        self.name, self.in_place = name, in_place

    def __call__(self, gm):
        return PassResult(gm, False)


def test_pass_manager_nests_and_names_the_failing_pass_and_the_passes_before_it():
    model, x = Net().eval(), torch.randn(4, 6)
    gm = capture(model, (x,)).program.module()
    inputs = sample_inputs((x,))
    inner = PassManager([Unchanged("look", True), PoisonOneWeight(NAN)], inputs, name="inner")
    outer = PassManager([Unchanged("first", True), inner], inputs, name="outer")
    with pytest.raises(VerificationError) as caught:
        outer(gm)
    message = str(caught.value)
    assert message.startswith("outer: pass 'inner' failed (passes before it: 'first')")
    assert "inner: pass 'poison' failed (passes before it: 'look')" in message


def test_nested_pass_manager_results_are_taken_by_name():
    model, x = Net().eval(), torch.randn(4, 6)
    gm = capture(model, (x,)).program.module()
    inputs = sample_inputs((x,))
    inner = PassManager([PoisonOneWeight(model.b.weight[0, 0].item())], inputs, name="inner")
    result = PassManager([Unchanged("first", True), inner], inputs)(gm)
    assert result.modified
    assert result.details["inner"].details["poison"].max_relative_error == 0.0
    assert not result.details["first"].modified


def test_pass_manager_rejects_two_passes_of_one_name():
    with pytest.raises(ValueError, match="unique"):
        PassManager([Unchanged("a", True), Unchanged("a", False)], [])


@pytest.mark.parametrize("in_place, snapshots", [(False, 0), (True, 1)])
def test_pass_manager_snapshots_reference_outputs_only_for_in_place_passes(monkeypatch, in_place, snapshots):
    """An unmodifying pass that leaves its input alone costs no forward pass; the positive
    control, the same pass declared in place, gets its snapshot."""
    from compile_toolkit.passes import manager

    model, x = Net().eval(), torch.randn(4, 6)
    gm = capture(model, (x,)).program.module()
    calls = []
    monkeypatch.setattr(manager, "outputs_of", lambda fn, inputs: calls.append(fn) or [])
    PassManager([Unchanged("look", in_place)], sample_inputs((x,)))(gm)
    assert len(calls) == snapshots


def test_passes_and_exporters_share_one_tolerance_per_output():
    """One rule (passes.verify.Tolerance): each output is held to its own scale, so a small output
    is not excused by a large one beside it (the exporters' check used the largest output of all),
    and the strip verifier and the artifact check give the same verdict."""
    from compile_toolkit.exporters.checks import CheckSet
    from compile_toolkit.passes.verify import Tolerance, deviation

    reference = [[torch.tensor([100.0, -50.0]), torch.tensor([0.01, 0.02])]]
    close = [[torch.tensor([100.0, -50.0]), torch.tensor([0.01, 0.0200000001])]]
    off = [[torch.tensor([100.0, -50.0]), torch.tensor([0.01, 0.0201])]]  # 0.5% of the small output
    tolerance = Tolerance(1e-4)
    assert deviation(reference, close, tolerance).excess == 0  # positive control
    found = deviation(reference, off, tolerance)
    assert found.excess > 0 and found.relative == pytest.approx(5e-3, rel=1e-3)
    assert found.max_abs == pytest.approx(1e-4, rel=1e-3)
    checks = CheckSet([(torch.zeros(1),)], reference[0:1], tolerance)
    assert checks.max_error("onnx", [0], close) < 1e-6
    with pytest.raises(VerificationError, match="onnx: max abs error"):
        checks.max_error("onnx", [0], off)
    assert deviation(reference, [[torch.tensor([100.0, -50.0])]], tolerance).excess == INF  # an output missing


class Cancels(nn.Module):
    """``(x + 1e4) - 1e4``: float32 keeps x to about 1e-3 (the spacing of floats near 1e4), float64 exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1e4) - 1e4


def test_an_artifact_within_the_references_own_float32_rounding_passes_and_a_real_error_does_not():
    """An artifact that computes the exact values (as a runtime that folds ``+ c - c`` would) is
    up to 5e-4 from the float32 reference, over the rule's bound for outputs near 2 (2e-4 + 1e-4).
    Where the rule fails, the artifact is judged against the model run in float64, allowing
    RUNTIME_ROUNDING times the float32 reference's own error: it passes, and its reported error
    is still the one against the reference. Controls: without the reference model the same
    artifact fails, and an error of 1e-2 fails the float64 judgement too, both numbers named."""
    from compile_toolkit.exporters.checks import RUNTIME_ROUNDING, CheckSet, build_checks

    x = torch.randn(4, 64)
    checks = build_checks(Cancels(), (x,), None, False, atol=1e-4, rtol=1e-4)
    exact = [[inputs[0].clone()] for inputs in checks.inputs]
    own = max(float((e[0] - x[0]).abs().max()) for e, x in zip(checks.expected, exact, strict=True))
    assert 1e-4 < own <= 5e-4  # half the float spacing near 1e4 (2**-10)
    assert checks.max_error("onnx", [0, 1], exact) == pytest.approx(own)
    strict = CheckSet(checks.inputs, checks.expected, checks.tolerance)
    with pytest.raises(VerificationError, match=r"onnx: max abs error .* \(rtol 0.0001 of each output's largest value "
                                                 r"\+ atol 0.0001\) against the reference$"):
        strict.max_error("onnx", [0, 1], exact)
    wrong = [[outputs[0] + 1e-2] for outputs in exact]
    assert 1e-2 > 3e-4 + RUNTIME_ROUNDING * own
    with pytest.raises(VerificationError, match=r"against the reference, and 0.01 from the float64 reference with 4 "
                                                r"times the float32 reference's own error \(0.000[1-5].*\) allowed"):
        checks.max_error("onnx", [0, 1], wrong)