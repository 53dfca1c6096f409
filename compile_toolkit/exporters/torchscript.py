"""``.pt`` TorchScript: a trace of the captured ATen graph, verified through ``torch.jit.load``.

Tracing records shapes read in Python as constants. An exported graph reads the batch size with
``torch.ops.aten.sym_size.int`` and passes it to ops called through ``torch.ops``, a path the
tracer cannot follow, so a plain trace bakes the example batch into every ``view``. Before
tracing, those reads become ``Tensor.size`` calls and the ops that consume them become the
ordinary ``Tensor`` methods or ``torch`` functions, which the tracer records as dynamic.
Verification at a second batch size catches anything that still bakes the batch.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx

from ..capture import Capture, Inputs
from ..errors import CtkError, VerificationError, summary
from .checks import flatten_outputs

FILENAME = "model.pt"
RUNTIME = f"torch.jit.load (torch {torch.__version__})"


def write(capture: Capture, path: str) -> None:
    """Trace the captured graph; script the original module only if tracing is impossible."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            compiled = torch.jit.trace(_traceable(capture.program), capture.example_inputs,
                                       check_trace=False)
    except Exception as trace_error:  # e.g. higher-order ops (cond, map) have no trace
        try:
            compiled = torch.jit.script(capture.module)
        except Exception as script_error:
            raise CtkError(f"torchscript: neither trace ({summary(trace_error)}) nor script "
                           f"({summary(script_error)}) worked") from script_error
    torch.jit.save(compiled, path)


def run(path: str, inputs: list[Inputs]) -> list[list[torch.Tensor]]:
    """Run the loaded module on each input. A failure at one batch size after success at another
    means the trace baked the batch size into the graph, and the error says so."""
    module = torch.jit.load(path)
    outputs: list[list[torch.Tensor]] = []
    worked: set[int] = set()
    with torch.no_grad():
        for batch in inputs:
            size = batch[0].shape[0]
            try:
                outputs.append(flatten_outputs(module(*batch)))
            except Exception as error:
                if not worked or size in worked:
                    raise
                raise VerificationError(
                    f"torchscript: the trace baked the batch size into the graph: it runs at "
                    f"batch {sorted(worked)} but fails at batch {size}: {summary(error)}"
                ) from error
            worked.add(size)
    return outputs


def _traceable(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """The program as a GraphModule whose batch-size reads the tracer can follow (module doc)."""
    module = program.module()
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)  # input-shape asserts: a trace would freeze them anyway
        elif node.target is torch.ops.aten.sym_size.int:
            node.op, node.target = "call_method", "size"
        elif isinstance(node.target, torch._ops.OpOverload) and _reads_symbolic_size(node):
            name = node.target.overloadpacket.__name__
            if hasattr(torch.Tensor, name):
                node.op, node.target = "call_method", name
            elif hasattr(torch, name):
                node.target = getattr(torch, name)
    module.recompile()
    return module


def _reads_symbolic_size(node: fx.Node) -> bool:
    return any(isinstance(arg.meta.get("val"), torch.SymInt) for arg in node.all_input_nodes)
