"""int8 for the ``.pt2`` artifact through torch's PT2E flow: prepare, calibrate, convert.

torch 2.9 ships PT2E in ``torch.ao.quantization`` (deprecated in favour of torchao, which is not
part of this environment) with ``X86InductorQuantizer``, the quantizer for the x86 CPU backend:
static int8, weights per output channel, activations per tensor. Its pattern matching reads
``source_fn_stack`` from each node's metadata, which only a *strict* (dynamo) ``torch.export``
records; the toolkit captures non-strict, and there the quantizer annotates nothing and
``convert_pt2e`` returns the float graph with no error (measured: 0 quantize nodes). So
:func:`quantize_program` names each conv/linear node's source function itself, and counts the
quantize nodes afterwards: every ``aten.conv2d`` / ``aten.linear`` must read a per-channel
dequantized weight and a dequantized activation, else no artifact is written.

The result is a reference-quantized graph (quantize/dequantize ops around float convs): it runs
anywhere torch runs and is what ``torch.compile``'s x86 backend lowers to integer kernels; run
eagerly it is slower than float, so its latency is not reported.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.export import ExportedProgram

from ..capture import Inputs
from ..errors import CtkError, summary

# What X86InductorQuantizer's pattern matcher looks for, keyed by the ATen op it sees.
_SOURCES = {torch.ops.aten.conv2d.default: F.conv2d, torch.ops.aten.linear.default: F.linear}
_QUANTIZE = ("quantize_per_tensor", "quantize_per_channel")


@dataclass(frozen=True)
class PT2ECount:
    """``layers``: conv2d/linear nodes; ``quantized``: those reading dequantized weight and input;
    ``quantize_nodes``: quantize ops inserted (weights and activations)."""

    layers: int
    quantized: int
    quantize_nodes: int
    float_layers: list[str]


def quantize_program(program: ExportedProgram, batches: Sequence[Inputs]) -> tuple[torch.fx.GraphModule, PT2ECount]:
    """The program's module, int8 by PT2E with ``X86InductorQuantizer`` and calibrated on
    ``batches``, and the count of what was quantized."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao -> torchao notice
        warnings.filterwarnings("ignore", message=r"erase_node\(.*\) on an already erased node")  # BN fold
        from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torch.ao.quantization.quantizer import x86_inductor_quantizer as x86

        module = program.module()
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target in _SOURCES:
                node.meta["source_fn_stack"] = [(node.name, _SOURCES[node.target])]
        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        try:
            prepared = prepare_pt2e(module, quantizer)
            with torch.no_grad():
                for batch in batches:
                    prepared(*batch)
            converted = convert_pt2e(prepared)
        except Exception as error:
            raise CtkError(f"pt2 int8: PT2E (X86InductorQuantizer) failed: {summary(error)}") from error
    _drop_unused_weights(converted)
    return converted, count_pt2e(converted)


def _drop_unused_weights(module: torch.fx.GraphModule) -> None:
    """Delete the float weights that ``convert_pt2e`` replaced by int8 constants but left on the
    module: exported again they would be stored too, and the int8 file would be larger than the
    float one (measured on digits-resnet: 292 kB against 230 kB)."""
    used = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    for name in [n for n, _ in (*module.named_parameters(), *module.named_buffers()) if n not in used]:
        owner, _, leaf = name.rpartition(".")
        delattr(module.get_submodule(owner) if owner else module, leaf)


def count_pt2e(module: torch.fx.GraphModule) -> PT2ECount:
    """Count the quantize nodes and the conv2d/linear nodes whose inputs are dequantized."""
    calls = [node for node in module.graph.nodes if node.op == "call_function"]
    quantize_nodes = sum(_name(node).startswith(_QUANTIZE) for node in calls)
    layers = [node for node in calls if node.target in _SOURCES]
    float_layers = [node.name for node in layers
                    if not all(isinstance(arg, torch.fx.Node) and _name(arg).startswith("dequantize")
                               for arg in node.args[:2])]
    return PT2ECount(len(layers), len(layers) - len(float_layers), quantize_nodes, float_layers)


def _name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))
