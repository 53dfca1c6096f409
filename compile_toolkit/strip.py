"""``ctk.strip``: capture a model and remove its dead channels, verified on sample inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from .capture import capture, eval_mode
from .passes.dce import DeadCodeElimination
from .passes.manager import PassManager
from .passes.strip import StripPass
from .passes.verify import Inputs, check_close, outputs_of, require_no_nan, sample_inputs


def strip(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    check_inputs: Sequence[Inputs] | None = None,
    rtol: float = 1e-5,
) -> GraphModule:
    """A smaller module that computes what ``model`` computes (eval mode).

    Every pass is checked against its input, and the result against ``model`` itself, on
    ``check_inputs`` (default: the example inputs plus two seeded random ones); a mismatch beyond
    ``rtol`` of the largest output raises :class:`~compile_toolkit.errors.VerificationError`.
    The summary (channels removed per group, barriers, error) is in ``result.meta["ctk_strip"]``.
    """
    inputs = list(check_inputs) if check_inputs is not None else sample_inputs(example_inputs)
    with eval_mode(model):
        reference = outputs_of(model, inputs)
    require_no_nan(reference, "its strip")
    gm = capture(model, example_inputs).program.module()
    gm, results = PassManager([StripPass(), DeadCodeElimination()], inputs, rtol).run(gm)
    summary = dict(results[0].details)
    summary["max_relative_error"] = check_close(reference, gm, inputs, rtol, "strip")
    gm.meta["ctk_strip"] = summary
    return gm

