"""``ctk.strip``: capture a model and remove its dead channels, verified on sample inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn
from torch.fx import GraphModule

from .capture import Inputs, adopt, capture, eval_mode
from .errors import CtkError, VerificationError
from .passes.dce import DeadCodeElimination
from .passes.fold import ConstantFolding
from .passes.manager import PassManager
from .passes.strip import StripPass, StripSummary
from .passes.verify import check_close, float64_outputs, outputs_of, relative_error, require_no_nan, sample_inputs

RTOL = 1e-5  # what a strip may change, relative to each output's largest value
_SUMMARY_KEY = "ctk_strip"  # where in ``GraphModule.meta`` (which deep copies keep) the summary lives
# A rewrite may differ from its input by as much as float32 rounding does. Where this many times the
# distance of the model's own float32 outputs from its float64 outputs exceeds ``rtol``, the check
# allows that much on top of ``rtol`` (smaller, it would not change a verdict). Measured: SmolLM2-135M with 90% of its MLP neurons pruned
# is 8.9e-6 from its float64 outputs (dense: 3.1e-6), its exact strip 1.4e-5 from them and 2.0e-5
# from the float32 model, which a flat 1e-5 refused.
ROUNDING_MARGIN = 2.0


def strip(
    model: nn.Module,
    example_inputs: Inputs,
    check_inputs: Sequence[Inputs] | None = None,
    rtol: float = RTOL,
) -> GraphModule:
    """A smaller module that computes what ``model`` computes (eval mode).

    Every pass is checked against its input, and the result against ``model`` itself, on
    ``check_inputs`` (default: the example inputs plus two seeded random ones); a mismatch beyond
    ``rtol`` of the largest output raises :class:`~compile_toolkit.errors.VerificationError`,
    unless the model's own float32 rounding is near that: then it may differ by
    :data:`ROUNDING_MARGIN` times that more (the summary's ``tolerance`` says what was allowed).
    The result stays a plain ``GraphModule``, callable like the model; what was removed and why
    the rest stayed is :func:`strip_summary` of it.
    """
    inputs = list(check_inputs) if check_inputs is not None else sample_inputs(example_inputs)
    with eval_mode(model):
        reference = outputs_of(model, inputs)
    require_no_nan(reference, "its strip")
    try:
        return _stripped(model, example_inputs, inputs, reference, rtol)
    except VerificationError as error:
        rounding = float32_rounding(model, inputs, reference)
        if rounding is None or ROUNDING_MARGIN * rounding <= rtol:
            raise
        tolerance = rtol + ROUNDING_MARGIN * rounding
        try:
            return _stripped(model, example_inputs, inputs, reference, tolerance)
        except VerificationError as again:
            raise VerificationError(f"{again} (the model's own float32 outputs are {rounding:.2g} from float64, "
                                    f"so {rtol:g} was widened to {tolerance:.2g})") from error


def _stripped(model: nn.Module, example_inputs: Inputs, inputs: list[Inputs], reference: list[list[torch.Tensor]],
              rtol: float) -> GraphModule:
    """The strip pipeline on a fresh capture of ``model``, each pass and the result checked
    against ``reference`` within ``rtol``."""
    captured = capture(model, example_inputs)
    # folding first: a weight computed from parameters alone is then a constant strip can slice
    pipeline = PassManager([ConstantFolding(), StripPass(), DeadCodeElimination()], inputs, rtol, name="ctk.strip")
    result = pipeline(captured.program.module())
    error, _ = check_close(reference, result.module, inputs, rtol, "strip")
    result.module.meta[_SUMMARY_KEY] = replace(result.details[StripPass.name].details, max_relative_error=error,
                                               tolerance=rtol)
    adopt(result.module, captured, "the stripped graph")  # exporting it then traces nothing again
    return result.module


def float32_rounding(model: nn.Module, inputs: Sequence[Inputs], reference: list[list[torch.Tensor]]) -> float | None:
    """How far ``model``'s float32 outputs on ``inputs`` (``reference``) are from its float64
    outputs, relative to each output's largest value: the error float32 itself makes. None where
    :func:`~compile_toolkit.passes.verify.float64_outputs` has no float64 outputs."""
    exact = float64_outputs(model, inputs)
    if exact is None:
        return None
    return relative_error(exact, [[t.double() for t in outputs] for outputs in reference])


def strip_summary(stripped: GraphModule) -> StripSummary:
    """The :class:`~compile_toolkit.passes.strip.StripSummary` of a module :func:`strip` returned:
    channels removed, each group's channels before and after, barriers, the verified error."""
    summary = stripped.meta.get(_SUMMARY_KEY)
    if not isinstance(summary, StripSummary):
        raise CtkError("this module was not made by ctk.strip, so it has no strip summary")
    return summary
