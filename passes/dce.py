"""Dead code elimination: drop nodes and attributes nothing reads any more."""

from __future__ import annotations

from torch.fx import GraphModule

from .base import GraphPass, PassResult


class DeadCodeElimination(GraphPass):
    name = "dce"

    def __call__(self, gm: GraphModule) -> PassResult:
        modified = gm.graph.eliminate_dead_code()
        if modified:
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(gm, modified)
