"""What every graph pass is: a small object with one entry point that returns a result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule


@dataclass
class PassResult:
    """The module after the pass, whether it changed, and a JSON-able summary for reports."""

    module: GraphModule
    modified: bool
    details: dict[str, Any] = field(default_factory=dict)


class GraphPass:
    """A rewrite of a ``torch.export``-captured graph module. It may edit its input in place;
    the :class:`~compile_toolkit.passes.manager.PassManager` checks the result against it."""

    name: str = "pass"

    def __call__(self, gm: GraphModule) -> PassResult:
        raise NotImplementedError
