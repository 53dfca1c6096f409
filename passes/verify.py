"""Numerical checks that a rewritten model still computes what its input computed."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from compile_toolkit.capture import Inputs, eval_mode
from compile_toolkit.errors import CtkError, VerificationError


def outputs_of(fn: Callable, inputs: Sequence[Inputs]) -> list[list[torch.Tensor]]:
    with torch.inference_mode():
        return [[t.detach().clone() for t in tree_leaves(fn(*x)) if isinstance(t, torch.Tensor)] for x in inputs]


def float64_outputs(model: nn.Module, inputs: Sequence[Inputs]) -> list[list[torch.Tensor]] | None:
    """``model``'s outputs on ``inputs`` computed in float64 (a copy of it, floating inputs
    widened): what its float32 outputs would be without rounding, the yardstick for how far float32
    itself is off. None for a model with weights not in float32 or whose code refuses float64."""
    params = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if any(t.dtype != torch.float32 for t in params):
        return None
    wide_inputs = [tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in x)
                   for x in inputs]
    try:
        wide = copy.deepcopy(model).double()
        with eval_mode(wide):
            return outputs_of(wide, wide_inputs)
    except Exception:  # the model's own code fixes a dtype or a quantized op: no measure, the strict rule stands
        return None


@dataclass(frozen=True)
class Tolerance:
    """The one rule every check applies (passes, strip, exporters, the ONNX strip): each output may
    differ from its reference by at most ``atol + rtol * scale``, its scale being its largest
    finite magnitude (so one ``rtol`` fits every model), and non-finite values must match exactly:
    a NaN or an infinity where the reference has a number is an infinite error, never a silent 0
    (``max(0.0, nan)`` is 0.0). Matching NaNs and infinities count as equal."""

    rtol: float
    atol: float = 0.0

    def bound(self, scale: float) -> float:
        return self.atol + self.rtol * scale


@dataclass(frozen=True)
class Deviation:
    """How far a candidate's outputs are from the reference's: the largest absolute error, the
    largest error relative to its output's scale, and the largest error beyond the tolerance's bound
    (0 when every output is within it)."""

    max_abs: float = 0.0
    relative: float = 0.0
    excess: float = 0.0


def deviation(reference: Sequence[Sequence[torch.Tensor]], candidate: Sequence[Sequence[torch.Tensor]],
              tolerance: Tolerance = Tolerance(0.0),
              allowance: Sequence[Sequence[float]] | None = None) -> Deviation:
    """Compare every output of every input (outputs of another count or shape are infinitely far);
    ``allowance`` widens each output's bound by that much (per input, per output)."""
    worst = Deviation()
    for i, (ref_outs, cand_outs) in enumerate(zip(reference, candidate, strict=True)):
        if len(ref_outs) != len(cand_outs):
            return Deviation(math.inf, math.inf, math.inf)
        for k, (ref, cand) in enumerate(zip(ref_outs, cand_outs, strict=True)):
            extra = allowance[i][k] if allowance is not None else 0.0
            worst = _worse(worst, _output_deviation(ref, cand, tolerance, extra))
    return worst


def relative_error(reference: list[list[torch.Tensor]], candidate: list[list[torch.Tensor]]) -> float:
    """max |a - b| / max |a| per output, the largest over all outputs (see :class:`Tolerance`)."""
    return deviation(reference, candidate).relative


def output_scale(output: torch.Tensor) -> float:
    """An output's largest finite magnitude (0 for booleans and outputs with no finite value)."""
    if output.dtype == torch.bool or not output.numel():
        return 0.0
    return float(output.detach().double().abs().nan_to_num(nan=0.0, posinf=0.0).max())


def _output_deviation(ref: torch.Tensor, cand: torch.Tensor, tolerance: Tolerance, extra: float = 0.0) -> Deviation:
    if tuple(ref.shape) != tuple(cand.shape):
        return Deviation(math.inf, math.inf, math.inf)
    if not ref.numel():
        return Deviation()
    r, c = ref.detach().cpu().double(), cand.detach().cpu().double()
    same = (r == c) | (r.isnan() & c.isnan())
    error = float(torch.where(same, torch.zeros_like(r), (r - c).abs()).nan_to_num(nan=math.inf, posinf=math.inf).max())
    scale = output_scale(ref)
    relative = error / max(scale, 1e-12) if error else 0.0
    return Deviation(error, relative, max(0.0, error - tolerance.bound(scale) - extra))


def _worse(a: Deviation, b: Deviation) -> Deviation:
    return Deviation(max(a.max_abs, b.max_abs), max(a.relative, b.relative), max(a.excess, b.excess))


def check_close(
    reference: list[list[torch.Tensor]], candidate: Callable, inputs: Sequence[Inputs], rtol: float, what: str
) -> tuple[float, list[list[torch.Tensor]]]:
    """Raise :class:`VerificationError` naming ``what`` when ``candidate`` drifts from ``reference``;
    else the error and ``candidate``'s outputs (the reference for whatever runs on it next)."""
    outputs = outputs_of(candidate, inputs)
    error = deviation(reference, outputs, Tolerance(rtol))
    if error.excess > 0:
        raise VerificationError(f"{what} changed the model's outputs: max relative error {error.relative:.3g} > "
                                f"{rtol:g}")
    return error.relative, outputs


def require_no_nan(reference: Sequence[Sequence[torch.Tensor]], what: str) -> None:
    """Refuse a reference that holds NaN: NaN equals nothing, so a check that lets it match itself
    accepts a broken model, and one that does not rejects every rewrite of it."""
    for index, outputs in enumerate(reference):
        for position, output in enumerate(outputs):
            if output.is_floating_point() and bool(output.isnan().any()):
                raise CtkError(f"the model outputs NaN on check input {index} (output {position}), so {what} "
                               "cannot be verified; are there NaN or infinite weights?")


def sample_inputs(example_inputs: Inputs, count: int = 2, seed: int = 0) -> list[Inputs]:
    """The example inputs plus ``count`` seeded random inputs of the same shapes and scale."""
    generator = torch.Generator().manual_seed(seed)
    samples = [tuple(example_inputs)]
    for _ in range(count):
        samples.append(tuple(_like(t, generator) for t in example_inputs))
    return samples


def _like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if not t.is_floating_point():
        return t.clone()
    noise = torch.randn(t.shape, generator=generator, dtype=t.dtype)
    return noise * (t.std() if t.numel() > 1 else 1.0) + t.mean()
