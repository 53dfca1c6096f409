"""Fuzzing the strip pass: random architectures and zero patterns (see ``fuzz_models``), each
stripped, compared with the unstripped model on fresh inputs and checked against the generator's
own count of removable channels. ``make fuzz`` runs thousands; this runs a seeded few hundred.
The positive controls show that both checks fail when the strip is wrong."""

from __future__ import annotations

import fuzz_models as fm
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compile_toolkit.passes.strip as strip_module
from compile_toolkit.capture import capture
from compile_toolkit.passes.strip import StripPass


@st.composite
def specs(draw) -> fm.ModelSpec:
    return fm.draw_spec(fm.HypothesisDraw(draw))


@settings(max_examples=150, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs())
def test_random_architectures_strip_exactly_and_completely(spec: fm.ModelSpec) -> None:
    outcome = fm.run_case(spec)
    assert not outcome.failures, f"{spec}\n" + "\n".join(outcome.failures)


# A residual conv stage whose zero pattern (seed 3) makes channels of the stream and of the
# branch's hidden layer removable.
CONTROL = fm.ModelSpec(
    in_channels=3, size=6,
    stages=(fm.StageSpec(fm.ConvSpec("dense", 6), fm.NormSpec("batch"), (
        fm.ConvBranch((fm.ConvSpec("dense", 4), fm.ConvSpec("dense", 6)), (fm.NormSpec("batch"), None),
                      ("relu", "none")),
    )),),
    tokens=(), head_pool=2, classes=2, weight_seed=1, zero_seed=3)


def test_control_case_has_removable_channels_that_strip_removes() -> None:
    case = fm.build(CONTROL)
    assert sum(len(g.removable) for g in case.groups) >= 2
    outcome = fm.run_case(CONTROL)
    assert outcome.failures == [] and outcome.checked >= 4 and outcome.removed >= 2


_analyze = strip_module.analyze


def _patched_analyze(change):
    """The strip pass's analysis, edited by ``change`` before the pass uses it."""
    def analyze(gm, *args, **kwargs):
        analysis = _analyze(gm, *args, **kwargs)
        change(analysis)
        return analysis

    return analyze


def test_oracle_catches_a_strip_that_leaves_a_zero_channel_behind(monkeypatch) -> None:
    def keep_one(analysis) -> None:  # exact, but one removable channel stays
        analysis.removable[np.flatnonzero(analysis.removable)[0]] = False

    monkeypatch.setattr(strip_module, "analyze", _patched_analyze(keep_one))
    outcome = fm.run_case(CONTROL)
    assert any(f.startswith("oracle:") for f in outcome.failures), outcome.failures
    assert not any(f.startswith("input") for f in outcome.failures)  # the numbers still agree


def test_numeric_check_catches_a_wrong_strip(monkeypatch) -> None:
    """Remove one live channel of the stem's group, bypassing ctk.strip's own verification:
    the fuzzer's comparison on fresh inputs must see it."""
    def remove_live(analysis) -> None:
        group = next(g for g in analysis.groups if "0.weight:0" in g.carriers)
        live = [c for c in group.components if not analysis.removable[c]]
        analysis.removable[live[0]] = True

    case = fm.build(CONTROL)
    monkeypatch.setattr(strip_module, "analyze", _patched_analyze(remove_live))
    gm = capture(case.model, (case.example,)).program.module()
    wrong = StripPass()(gm).module
    assert fm.compare(case.model, wrong, fm.fresh_inputs(case))


def test_compare_fails_on_new_nans_and_on_drift_beyond_tolerance() -> None:
    x = [torch.ones(2, 3)]
    reference = lambda t: t * 2  # noqa: E731
    assert fm.compare(reference, lambda t: t * 2 * (1 + 1e-7), x) == []
    assert fm.compare(reference, lambda t: t * 2 * (1 + 1e-4), x)
    assert fm.compare(reference, lambda t: torch.where(t > 0, torch.nan, t), x)
    assert fm.compare(lambda t: t / 0, lambda t: t * torch.inf, x) == []  # the same infinities
    assert fm.compare(lambda t: t / 0, lambda t: -t / 0, x)


def test_oracle_is_not_vacuous_on_seeded_cases() -> None:
    """Most parameter dims the generator knows to be removable are checked, not excused."""
    checked = excused = 0
    for seed in range(8):
        outcome = fm.run_case(fm.draw_spec(fm.RandomDraw(seed)))
        assert not outcome.failures, outcome.failures
        checked, excused = checked + outcome.checked, excused + outcome.excused
    assert checked >= 40 and excused < checked / 2
