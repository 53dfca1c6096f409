"""An ``ExportedProgram`` for a rewritten graph module, without capturing it again.

Passes (folding, strip) rewrite ``program.module()``: the unlifted form, where parameters are
``get_attr`` nodes. The exporters need an ``ExportedProgram``, and ``torch.export`` of the rewritten
module would trace the whole model a second time (the costliest step of a job after training).
Here the rewritten graph is lifted back instead, the way ``torch.export`` lays a program out:
every ``get_attr`` becomes an input placeholder (parameters, then buffers, then constants, then
the user's inputs), and each node's ``meta["val"]`` is propagated again on fake tensors, the
user's inputs keeping the source program's symbolic shapes (or the example's static ones, for
the static-batch program XLA needs). The result is checked by ``ExportedProgram``'s verifier, and
every artifact made from it is verified against the model like any other.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import ExportedProgram
from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
from torch.export.graph_signature import (
    ConstantArgument,
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    SymIntArgument,
    TensorArgument,
)
from torch.fx import Graph, GraphModule, Interpreter, Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .errors import CtkError, summary

_PREFIX = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_", InputKind.CONSTANT_TENSOR: "c_"}


def lift(gm: GraphModule, source: ExportedProgram, static_inputs: tuple[torch.Tensor, ...] | None = None
         ) -> ExportedProgram:
    """The program of ``gm``, a rewrite of ``source.module()`` that takes and returns what it does.

    ``static_inputs``: fix every input shape to theirs (no symbolic dims); default: the source
    program's input shapes, symbolic batch included. Raises :class:`CtkError` for a graph this
    cannot lift (a submodule call, a size the rewrite fixed): the caller captures it instead.
    """
    graph = copy.deepcopy(gm.graph)
    _drop_guard_calls(graph)
    for node in graph.nodes:
        if node.op == "call_module":
            raise CtkError(f"cannot lift {node.format_node()}: a call of a submodule")
    persistent = {spec.target: spec.persistent for spec in source.graph_signature.input_specs
                  if spec.kind == InputKind.BUFFER}
    values, kinds = _lifted_values(gm, graph)
    user = [node for node in graph.nodes if node.op == "placeholder"]
    _name_like(user, source.graph_signature.user_inputs)
    placeholders = _add_placeholders(graph, user, kinds)
    specs = [InputSpec(kind, TensorArgument(placeholders[target].name), target,
                       persistent.get(target, True) if kind == InputKind.BUFFER else None)
             for target, kind in kinds.items()]
    specs += [InputSpec(InputKind.USER_INPUT, TensorArgument(node.name), None) for node in user]
    outputs = [_argument(arg) for arg in graph.output_node().args[0]]
    lifted = GraphModule(nn.Module(), graph)
    _propagate(lifted, [values[target] for target in kinds], user, source, static_inputs)
    root = source.module_call_graph[0].signature
    assert root is not None, "torch.export always records the root call's signature"
    call = ModuleCallSignature(inputs=[TensorArgument(node.name) for node in user], outputs=outputs,
                               in_spec=root.in_spec, out_spec=root.out_spec, forward_arg_names=root.forward_arg_names)
    stateful = {target for target, kind in kinds.items() if kind == InputKind.PARAMETER
                or (kind == InputKind.BUFFER and persistent.get(target, True))}
    return ExportedProgram(
        root=lifted, graph=lifted.graph,
        graph_signature=ExportGraphSignature(specs, [OutputSpec(OutputKind.USER_OUTPUT, arg, None) for arg in outputs]),
        state_dict={target: values[target] for target in stateful},
        range_constraints={} if static_inputs is not None else dict(source.range_constraints),
        module_call_graph=[ModuleCallEntry("", call)],
        example_inputs=(tuple(static_inputs), {}) if static_inputs is not None else source.example_inputs,
        constants={target: values[target] for target in kinds if target not in stateful},
        verifiers=list(source.verifiers))


def _drop_guard_calls(graph: Graph) -> None:
    """``module()`` calls a ``_guards_fn`` submodule that checks input shapes; a program keeps its
    guards as range constraints instead."""
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)


def _name_like(user: list[Node], names: Sequence[str]) -> None:
    """Give the user's inputs the source program's names. ``module()`` renames an input that shadows
    a builtin (``input`` becomes ``input_1``), and ONNX's decomposition, which traces the program
    again, names it after the signature: the two must agree."""
    if len(user) != len(names):
        raise CtkError(f"cannot lift: {len(user)} graph inputs for the source program's {len(names)}")
    if not user:
        return
    taken = {node.name for node in user[0].graph.nodes} - {node.name for node in user}
    for node, name in zip(user, names, strict=True):
        if name in taken:
            raise CtkError(f"cannot lift: input name {name} is taken by another node")
        node.name = node.target = name


def _lifted_values(gm: GraphModule, graph: Graph) -> tuple[dict[str, torch.Tensor], dict[str, InputKind]]:
    """Each ``get_attr`` target's value and input kind, parameters first, then buffers, then constants."""
    parameters = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    values: dict[str, torch.Tensor] = {}
    for node in graph.nodes:
        if node.op != "get_attr" or node.target in values:
            continue
        owner, _, name = node.target.rpartition(".")
        value = getattr(gm.get_submodule(owner) if owner else gm, name)
        if not isinstance(value, torch.Tensor):
            raise CtkError(f"cannot lift get_attr {node.target}: a {type(value).__name__}, not a tensor")
        values[node.target] = value
    order = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    kind = {t: InputKind.PARAMETER if t in parameters else InputKind.BUFFER if t in buffers
            else InputKind.CONSTANT_TENSOR for t in values}
    ranked = sorted(values, key=lambda t: order.index(kind[t]))
    return values, {t: kind[t] for t in ranked}


def _add_placeholders(graph: Graph, user: list[Node], kinds: dict[str, InputKind]) -> dict[str, Node]:
    """A placeholder per lifted target, before the user's inputs, replacing its ``get_attr`` nodes."""
    first = user[0] if user else next(iter(graph.nodes))
    placeholders = {}
    with graph.inserting_before(first):
        for target, kind in kinds.items():
            placeholders[target] = graph.placeholder(_PREFIX[kind] + target.replace(".", "_").lower())
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target in placeholders:
            node.replace_all_uses_with(placeholders[node.target])
            graph.erase_node(node)
    return placeholders


def _argument(arg: object) -> TensorArgument | SymIntArgument | ConstantArgument:
    if not isinstance(arg, Node):
        return ConstantArgument("", arg)  # type: ignore[arg-type]
    if isinstance(arg.meta.get("val"), torch.Tensor) or "val" not in arg.meta:
        return TensorArgument(arg.name)
    return SymIntArgument(arg.name)


def _propagate(gm: GraphModule, lifted: list[torch.Tensor], user: list[Node], source: ExportedProgram,
               static_inputs: tuple[torch.Tensor, ...] | None) -> None:
    """Fill every node's ``meta["val"]`` again: the rewrite changed shapes the old metadata records.

    Dynamic inputs keep the source program's symbols, in its shape environment, with guards
    suppressed: fake kernels guard on size hints for choices that do not change what is computed
    (a convolution's memory format), and those must not narrow the program's input ranges. What
    the rewritten graph really decides about those sizes is then checked by :func:`_check_symbolic`."""
    if static_inputs is not None:
        _static_values(gm, lifted, static_inputs)
        return
    user_values = [node.meta["val"] for node in user]
    mode = detect_fake_mode(user_values)
    if mode is None or mode.shape_env is None:
        raise CtkError("cannot lift: the source program's inputs carry no symbolic fake tensors")
    with mode:
        inputs = [mode.from_tensor(t, static_shapes=True) for t in lifted] + user_values
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    # The python dispatcher, as torch.export traces with: without it a composite op such as
    # aten.linear on a [batch, tokens, features] input decomposes through C++ kernels that fix
    # both sizes to their examples (measured: a decoder's q_proj came out [5, (s70*s72)//5, 32]).
    with mode.shape_env.suppress_guards(), enable_python_dispatcher():
        FakeTensorProp(gm, mode=mode).propagate_dont_convert_inputs(*inputs)
    _check_symbolic(gm, lifted, user_values, mode.shape_env)


def _static_values(gm: GraphModule, lifted: list[torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
    """Every node's ``meta["val"]`` for inputs of fixed shapes."""
    mode = FakeTensorMode()
    FakeTensorProp(gm, mode=mode).propagate_dont_convert_inputs(
        *[mode.from_tensor(t, static_shapes=True) for t in (*lifted, *inputs)])


class _Recorder(Interpreter):
    """Runs a graph (on fake tensors) and keeps each node's value, leaving its metadata alone."""

    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[Node, object] = {}

    def run_node(self, n: Node) -> object:
        self.values[n] = value = super().run_node(n)
        return value


def _check_symbolic(gm: GraphModule, lifted: list[torch.Tensor], user_values: list[torch.Tensor], env) -> None:
    """Run the graph again at other sizes of every symbolic input dim (each symbol's example size
    plus one) and require every symbolic size in the metadata to come out as its formula says: a
    rewrite that wrote a symbolic size as a constant fails here (a reshape that no longer fits, or a
    size that did not follow)."""
    other: dict = {}
    shapes = []
    for value in user_values:
        shape = []
        for size in value.shape:
            if isinstance(size, torch.SymInt):
                symbol = size.node.expr
                if not symbol.is_Symbol:
                    raise CtkError(f"cannot lift: an input size is the formula {symbol}, not a free size")
                other.setdefault(symbol, _other_size(env, symbol))
                shape.append(other[symbol])
            else:
                shape.append(size)
        shapes.append(shape)
    if not other:
        return
    mode = FakeTensorMode()
    recorder = _Recorder(gm)
    try:
        with mode:
            recorder.run(*[mode.from_tensor(t, static_shapes=True) for t in lifted],
                         *[torch.empty(shape, dtype=v.dtype) for shape, v in zip(shapes, user_values, strict=True)])
    except Exception as error:  # noqa: BLE001 - the graph does not run at other sizes
        raise CtkError(f"cannot lift: the rewritten graph does not run at other input sizes ({summary(error)})") from None
    for node in gm.graph.nodes:
        expected, got = node.meta.get("val"), recorder.values.get(node)
        if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor):
            continue
        sizes = [int(s.node.expr.subs(other)) if isinstance(s, torch.SymInt) else s for s in expected.shape]
        if sizes != list(got.shape):
            raise CtkError(f"cannot lift: {node.name} is {list(got.shape)} at other input sizes, not {sizes}")


def _other_size(env, symbol) -> int:
    """A size other than the symbol's example size, inside its range."""
    hint = int(env.var_to_val[symbol])
    upper = env.var_to_range[symbol].upper
    return hint + 1 if hint + 1 <= upper else hint - 1
