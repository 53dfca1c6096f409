"""Runs graph passes in order and checks each one against its input on sample inputs."""

from __future__ import annotations

from collections.abc import Sequence

from torch.fx import GraphModule

from .base import GraphPass, PassResult
from .verify import Inputs, check_close, outputs_of


class PassManager:
    """``PassManager([StripPass(), DeadCodeElimination()], inputs).run(gm)``.

    Each pass's output must match its input within ``rtol`` (relative to the largest output) on
    every sample input, or :class:`~compile_toolkit.errors.VerificationError` names the pass.
    """

    def __init__(self, passes: Sequence[GraphPass], check_inputs: Sequence[Inputs], rtol: float = 1e-5) -> None:
        self.passes = list(passes)
        self.check_inputs = list(check_inputs)
        self.rtol = rtol

    def run(self, gm: GraphModule) -> tuple[GraphModule, list[PassResult]]:
        results = []
        for graph_pass in self.passes:
            reference = outputs_of(gm, self.check_inputs)  # before the pass edits gm in place
            result = graph_pass(gm)
            if result.modified:
                error = check_close(reference, result.module, self.check_inputs, self.rtol, f"pass {graph_pass.name!r}")
                result.details["max_relative_error"] = error
            results.append(result)
            gm = result.module
        return gm, results
