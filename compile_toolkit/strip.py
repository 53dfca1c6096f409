"""``ctk.strip``: capture a model and remove its dead channels, verified on sample inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import nn
from torch.fx import GraphModule

from .capture import Inputs, adopt, capture, eval_mode
from .errors import CtkError
from .passes.dce import DeadCodeElimination
from .passes.fold import ConstantFolding
from .passes.manager import PassManager
from .passes.strip import StripPass, StripSummary
from .passes.verify import check_close, outputs_of, require_no_nan, sample_inputs

_SUMMARY_KEY = "ctk_strip"  # where in ``GraphModule.meta`` (which deep copies keep) the summary lives


def strip(
    model: nn.Module,
    example_inputs: Inputs,
    check_inputs: Sequence[Inputs] | None = None,
    rtol: float = 1e-5,
) -> GraphModule:
    """A smaller module that computes what ``model`` computes (eval mode).

    Every pass is checked against its input, and the result against ``model`` itself, on
    ``check_inputs`` (default: the example inputs plus two seeded random ones); a mismatch beyond
    ``rtol`` of the largest output raises :class:`~compile_toolkit.errors.VerificationError`.
    The result stays a plain ``GraphModule``, callable like the model; what was removed and why
    the rest stayed is :func:`strip_summary` of it.
    """
    inputs = list(check_inputs) if check_inputs is not None else sample_inputs(example_inputs)
    with eval_mode(model):
        reference = outputs_of(model, inputs)
    require_no_nan(reference, "its strip")
    captured = capture(model, example_inputs)
    # folding first: a weight computed from parameters alone is then a constant strip can slice
    pipeline = PassManager([ConstantFolding(), StripPass(), DeadCodeElimination()], inputs, rtol, name="ctk.strip")
    result = pipeline(captured.program.module())
    error, _ = check_close(reference, result.module, inputs, rtol, "strip")
    result.module.meta[_SUMMARY_KEY] = replace(result.details[StripPass.name].details, max_relative_error=error)
    adopt(result.module, captured, "the stripped graph")  # exporting it then traces nothing again
    return result.module


def strip_summary(stripped: GraphModule) -> StripSummary:
    """The :class:`~compile_toolkit.passes.strip.StripSummary` of a module :func:`strip` returned:
    channels removed, each group's channels before and after, barriers, the verified error."""
    summary = stripped.meta.get(_SUMMARY_KEY)
    if not isinstance(summary, StripSummary):
        raise CtkError("this module was not made by ctk.strip, so it has no strip summary")
    return summary
