"""Check inputs, reference outputs and the one comparison every artifact must pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..capture import Inputs, eval_mode, other_batch_size
from ..errors import CtkError, VerificationError, summary
from ..passes.verify import Deviation, Tolerance, deviation, float64_outputs, require_no_nan

# How much less exact than PyTorch a runtime's float32 may be before an artifact is judged wrong.
# Measured: SmolLM2-135M with 66% of its key/value groups and neurons pruned, on random token ids,
# is 0.0023 from its float64 logits in PyTorch and 0.0040 in ONNX Runtime (the two 0.0055 apart,
# over the rule's 0.0039); a uniformly pruned 2x SmolLM2 had ONNX Runtime 0.0205 from PyTorch where
# PyTorch was 0.0066 from float64. On text all three are about 1e-4.
RUNTIME_ROUNDING = 4.0


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

    With ``reference`` (the model itself), an artifact with an output beyond the tolerance is
    judged again against the truth the float32 reference approximates: the same model run in
    float64 on the same input, with :data:`RUNTIME_ROUNDING` times the float32 reference's own
    error added to each output's bound. Two float32 computations of a deep model can differ by
    more than the rule allows with nothing wrong; a wrong channel or constant is still far beyond.
    It is measured only where the rule fails (a float64 copy of a large model is large), and a
    model that cannot run in float64 keeps the strict rule."""

    inputs: list[Inputs]
    expected: list[list[torch.Tensor]]
    tolerance: Tolerance
    reference: nn.Module | None = None
    _exact: dict[int, list[torch.Tensor] | None] = field(default_factory=dict, repr=False, compare=False)

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
        if found.excess > 0:
            judged, allowed = self._against_float64(indices, outputs)
            if judged is None or judged.excess > 0:
                raise VerificationError(f"{fmt}: max abs error {found.max_abs:.3g} exceeds the tolerance (rtol "
                                        f"{self.tolerance.rtol:g} of each output's largest value + atol "
                                        f"{self.tolerance.atol:g}) against the reference{allowed}")
        return found.max_abs

    def _against_float64(self, indices: Sequence[int],
                         outputs: Sequence[Sequence[torch.Tensor]]) -> tuple[Deviation | None, str]:
        """The artifact's deviation from the float64 reference with :data:`RUNTIME_ROUNDING` times
        the float32 reference's own error allowed per output, and how that reads in a message;
        (None, "") where there is no float64 reference."""
        exact = [self._float64(i) for i in indices]
        if any(e is None for e in exact):
            return None, ""
        own = [[deviation([[x]], [[e]]).max_abs for x, e in zip(per_exact, self.expected[i], strict=True)]
               for i, per_exact in zip(indices, exact, strict=True)]
        judged = deviation(exact, outputs, self.tolerance, [[RUNTIME_ROUNDING * e for e in per] for per in own])
        largest = max(max(per, default=0.0) for per in own)
        return judged, (f", and {judged.max_abs:.3g} from the float64 reference with {RUNTIME_ROUNDING:g} times "
                        f"the float32 reference's own error ({largest:.3g}) allowed")

    def _float64(self, index: int) -> list[torch.Tensor] | None:
        """The reference's float64 outputs on check input ``index``, computed once for every format."""
        if index not in self._exact:
            found = float64_outputs(self.reference, [self.inputs[index]]) if self.reference is not None else None
            self._exact[index] = found[0] if found is not None and len(found[0]) == len(self.expected[index]) else None
        return self._exact[index]

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


def _reference_outputs(reference: nn.Module, inputs: Inputs, index: int) -> list[torch.Tensor]:
    try:
        with eval_mode(reference), torch.no_grad():
            return [t.detach().clone() for t in flatten_outputs(reference(*inputs))]
    except Exception as error:  # the user's reference model: any failure is theirs to see
        raise CtkError(f"the reference model fails on check input {index} (shapes "
                       f"{shapes_of(inputs)}): {summary(error)}") from error
