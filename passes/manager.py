"""Runs graph passes in order and checks each one against its input on sample inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch.fx import GraphModule

from compile_toolkit.capture import Inputs
from compile_toolkit.errors import CtkError

from .base import GraphPass, PassResult
from .verify import check_close, outputs_of

Outputs = list[list[torch.Tensor]]


class PassManager(GraphPass):
    """``PassManager([StripPass(), DeadCodeElimination()], inputs)(gm)``: a pass made of passes.

    Each pass's output must match its input within ``rtol`` (relative to the largest output) on
    every sample input, or :class:`~compile_toolkit.errors.VerificationError` names the pass. The
    result's ``details`` maps each pass's name to its :class:`PassResult`, so callers take a
    pass's summary by name; a manager is a pass itself, so pipelines nest.
    """

    name = "pipeline"

    def __init__(self, passes: Sequence[GraphPass], check_inputs: Sequence[Inputs], rtol: float = 1e-5,
                 name: str | None = None) -> None:
        self.passes = list(passes)
        names = [p.name for p in self.passes]
        if len(set(names)) != len(names):
            raise ValueError(f"pass names must be unique, so results can be taken by name: {names}")
        self.check_inputs = list(check_inputs)
        self.rtol = rtol
        self.name = name or self.name
        self.in_place = any(p.in_place for p in self.passes)

    def __call__(self, gm: GraphModule) -> PassResult:
        results: dict[str, PassResult] = {}
        reference: Outputs | None = None  # outputs of ``gm``; each verified pass hands its own on
        for graph_pass in self.passes:
            if graph_pass.in_place and reference is None:
                reference = outputs_of(gm, self.check_inputs)  # before the pass edits gm
            try:
                result, reference = self._run_one(graph_pass, gm, reference)
            except CtkError as error:  # one line for the user, naming the pass
                raise type(error)(f"{self._where(graph_pass, results)}: {error}") from error
            except Exception as error:  # a bug: keep its type and traceback, add where it happened
                error.add_note(self._where(graph_pass, results))
                raise
            results[graph_pass.name] = result
            gm = result.module
        return PassResult(gm, any(r.modified for r in results.values()), results)

    def _run_one(self, graph_pass: GraphPass, gm: GraphModule, reference: Outputs | None
                 ) -> tuple[PassResult, Outputs | None]:
        """Run one pass and, if it changed anything, check it; returns the result and the
        outputs of its module (the next pass's reference, so no output is computed twice)."""
        result = graph_pass(gm)
        if not result.modified:
            return result, reference
        if reference is None:  # not in place: ``gm`` is as it was
            reference = outputs_of(gm, self.check_inputs)
        error, outputs = check_close(reference, result.module, self.check_inputs, self.rtol,
                                     f"pass {graph_pass.name!r}")
        return replace(result, max_relative_error=error), outputs

    def _where(self, failing: GraphPass, done: dict[str, PassResult]) -> str:
        before = ", ".join(repr(name) for name in done) or "none"
        return f"{self.name}: pass {failing.name!r} failed (passes before it: {before})"
