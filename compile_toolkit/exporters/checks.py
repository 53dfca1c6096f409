"""Check inputs, reference outputs and the one comparison every artifact must pass."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..capture import Inputs, eval_mode, other_batch_size
from ..errors import CtkError, VerificationError, summary
from ..passes.verify import Tolerance, deviation, require_no_nan


def as_inputs(inputs: torch.Tensor | Sequence[torch.Tensor]) -> Inputs:
    """A positional-input tuple; a bare tensor means one input (not a tuple of its rows)."""
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def flatten_outputs(outputs: object) -> list[torch.Tensor]:
    """A model's outputs (tensor, tuple, list, dict, nested) as a flat list, in the order that
    ``torch.export`` and the ONNX exporter use for the graph outputs."""
    return [leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]


def random_inputs(example: Inputs, seed: int = 0) -> Inputs:
    """New inputs with the example's shapes and dtypes: normal floats, integers within the
    example's range (token ids, labels), random booleans."""
    generator = torch.Generator().manual_seed(seed)
    made = []
    for t in example:
        if t.dtype == torch.bool:
            made.append(torch.randint(0, 2, t.shape, generator=generator).bool())
        elif t.is_floating_point():
            made.append(torch.randn(t.shape, generator=generator, dtype=t.dtype))
        else:
            low, high = int(t.min()), int(t.max()) + 1
            made.append(torch.randint(low, high, t.shape, generator=generator, dtype=t.dtype))
    return tuple(made)


def shapes_of(inputs: Inputs) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in inputs]


@dataclass(frozen=True)
class CheckSet:
    """Inputs every artifact runs on, what the reference returned for them, and the tolerance
    (:class:`~compile_toolkit.passes.verify.Tolerance`) every output of an artifact must meet.

    With ``reference`` (the model itself), an output beyond the tolerance is judged again with
    twice the reference's own float32 rounding error added to its bound: how far the reference's
    outputs are from the same model run in float64 on the same input. Two float32 computations of
    a deep model can differ by that much with nothing wrong (SmolLM2-135M with 66% of its
    key/value groups and neurons pruned, on random token ids: 6.2e-5 of the largest logit from
    float64, and ONNX Runtime 1.45e-4 from PyTorch, over the rule's 1e-4); a wrong channel or
    constant is still far beyond. It is measured only where the rule fails (a float64 copy of a
    large model is large), and a model that cannot run in float64 gets no allowance."""

    inputs: list[Inputs]
    expected: list[list[torch.Tensor]]
    tolerance: Tolerance
    reference: nn.Module | None = None
    _rounding: dict[int, list[float]] = field(default_factory=dict, repr=False, compare=False)

    def runnable(self, fmt: str, static_shapes: list[tuple[int, ...]] | None) -> list[int]:
        """Indices of the check inputs an artifact can run: all of them, or for a static-shape
        artifact those with exactly its input shapes (at least one, or CtkError)."""
        if static_shapes is None:
            return list(range(len(self.inputs)))
        found = [i for i, inputs in enumerate(self.inputs) if shapes_of(inputs) == static_shapes]
        if not found:
            raise CtkError(f"{fmt}: the artifact only takes inputs of shapes {static_shapes}, "
                           "and no check input has them")
        return found

    def max_error(self, fmt: str, indices: Sequence[int],
                  outputs: Sequence[Sequence[torch.Tensor]]) -> float:
        """Largest ``|artifact - reference|`` over the given check inputs and all outputs; raise
        VerificationError naming ``fmt`` if shapes differ or an output is beyond the tolerance."""
        self._check_shapes(fmt, indices, outputs)
        expected = [self.expected[i] for i in indices]
        found = deviation(expected, outputs, self.tolerance)
        rounding = ""
        if found.excess > 0 and self.reference is not None:
            errors = [self._float32_error(i) for i in indices]
            found = deviation(expected, outputs, self.tolerance, [[2 * e for e in per] for per in errors])
            rounding = f" + twice the reference's own float32 error ({max(max(per, default=0.0) for per in errors):.3g})"
        if found.excess > 0:
            raise VerificationError(f"{fmt}: max abs error {found.max_abs:.3g} exceeds the tolerance (rtol "
                                    f"{self.tolerance.rtol:g} of each output's largest value + atol "
                                    f"{self.tolerance.atol:g}{rounding}) against the reference")
        return found.max_abs

    def _float32_error(self, index: int) -> list[float]:
        """:func:`float32_rounding` of check input ``index``, measured once for every format that needs it."""
        if index not in self._rounding:
            self._rounding[index] = float32_rounding(self.reference, self.inputs[index], self.expected[index])
        return self._rounding[index]

    def deviation(self, fmt: str, indices: Sequence[int],
                  outputs: Sequence[Sequence[torch.Tensor]]) -> float:
        """Largest ``|artifact - reference|``, held to no tolerance (int8 artifacts are judged by
        the task metric instead); differing output counts or shapes still raise."""
        self._check_shapes(fmt, indices, outputs)
        return deviation([self.expected[i] for i in indices], outputs).max_abs

    def _check_shapes(self, fmt: str, indices: Sequence[int], outputs: Sequence[Sequence[torch.Tensor]]) -> None:
        """Outputs of another count or shape than the reference's are an error naming them."""
        for index, got in zip(indices, outputs, strict=True):
            want = self.expected[index]
            batch = self.inputs[index][0].shape[0]
            if len(got) != len(want):
                raise VerificationError(f"{fmt}: {len(got)} outputs, reference has {len(want)} "
                                        f"(check input {index}, batch {batch})")
            for k, (a, r) in enumerate(zip(got, want, strict=True)):
                if tuple(a.shape) != tuple(r.shape):
                    raise VerificationError(
                        f"{fmt}: output {k} has shape {list(a.shape)}, reference {list(r.shape)} "
                        f"(check input {index}, batch {batch})")


def build_checks(reference: nn.Module, example: Inputs, check_inputs: Sequence[Inputs] | None,
                 dynamic_batch: bool, atol: float, rtol: float) -> CheckSet:
    """Check inputs (default: the example and one seeded random input of the same shapes; with a
    dynamic batch, a second batch size is added if missing: batch 1, or 2 for a batch-1 example)
    and the reference's outputs on them, computed once for all formats."""
    inputs = ([as_inputs(c) for c in check_inputs] if check_inputs
              else [example, random_inputs(example)])
    if dynamic_batch and len({c[0].shape[0] for c in inputs}) == 1:
        inputs.append(other_batch_size(inputs[0]))
    expected = [_reference_outputs(reference, c, index) for index, c in enumerate(inputs)]
    require_no_nan(expected, "its artifacts")
    return CheckSet(inputs, expected, Tolerance(rtol, atol), reference)


def float32_rounding(reference: nn.Module, inputs: Inputs, expected: Sequence[torch.Tensor]) -> list[float]:
    """Per output, the largest ``|float32 - float64|`` of ``reference`` on ``inputs`` (floating
    inputs cast to float64, ``expected`` its float32 outputs); zeros where the model cannot run in
    float64 or an output is not floating point."""
    try:
        twin = copy.deepcopy(reference).double()
        with eval_mode(twin), torch.no_grad():
            exact = flatten_outputs(twin(*(t.double() if t.is_floating_point() else t for t in inputs)))
    except Exception:  # quantized or float32-only ops: the strict rule alone
        return [0.0] * len(expected)
    if len(exact) != len(expected):
        return [0.0] * len(expected)
    return [float((e.double() - x.double()).abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max())
            if e.is_floating_point() and x.shape == e.shape and e.numel() else 0.0
            for e, x in zip(expected, exact, strict=True)]


def _reference_outputs(reference: nn.Module, inputs: Inputs, index: int) -> list[torch.Tensor]:
    try:
        with eval_mode(reference), torch.no_grad():
            return [t.detach().clone() for t in flatten_outputs(reference(*inputs))]
    except Exception as error:  # the user's reference model: any failure is theirs to see
        raise CtkError(f"the reference model fails on check input {index} (shapes "
                       f"{shapes_of(inputs)}): {summary(error)}") from error
