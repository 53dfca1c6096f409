"""Named regressions from fuzzing the strip pass (``make fuzz``, ``tests/test_fuzz_strip.py``).

Each test is one case the fuzzer found, kept small."""

from __future__ import annotations

import fuzz_models as fm


def test_dead_channels_behind_softplus_are_removed() -> None:
    """Softplus had no rule (a barrier) until pointwise ops came from ATen's tags.
    Hidden channel 2 of the branch is ignored by the next conv (zeroed input columns): dead,
    whatever softplus computes, so it can go; the stream's channels 2 and 3 are zero or dead."""
    spec = fm.ModelSpec(
        in_channels=3, size=4,
        stages=(fm.StageSpec(fm.ConvSpec("dense", 4), None, (
            fm.ConvBranch((fm.ConvSpec("dense", 4), fm.ConvSpec("dense", 4)), (None, None), ("softplus", "none")),
        )),),
        tokens=(), head_pool=1, classes=2, weight_seed=5, zero_seed=0)
    outcome = fm.run_case(spec)
    assert outcome.failures == []
    assert outcome.excused == 0, outcome.reasons
