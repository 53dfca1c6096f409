"""What every graph pass is: a small object with one entry point that returns a result.

The shape follows ``torch.fx.passes.infra`` and ``onnx_ir.passes``: a pass is a callable from a
module to a :class:`PassResult`, so a pipeline of passes is itself a pass and pipelines nest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.fx import GraphModule


@dataclass(frozen=True)
class PassResult:
    """The module after the pass, whether it changed, the pass's own summary (``details``: a
    typed object such as :class:`~compile_toolkit.passes.strip.StripSummary`, or ``None``) and,
    once a :class:`~compile_toolkit.passes.manager.PassManager` has checked the pass, the largest
    relative output error it measured."""

    module: GraphModule
    modified: bool
    details: Any = None
    max_relative_error: float | None = None


class GraphPass:
    """A rewrite of a ``torch.export``-captured graph module.

    ``in_place`` says whether the pass edits its input (``True``) or returns a new module and
    leaves its input as it was: the pass manager must snapshot the reference outputs before an
    in-place pass runs, and can compute them afterwards, only when needed, for any other."""

    name: str = "pass"
    in_place: bool = True

    def __call__(self, gm: GraphModule) -> PassResult:
        raise NotImplementedError
