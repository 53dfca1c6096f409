"""Numerical checks that a rewritten model still computes what its input computed."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils._pytree import tree_leaves

from compile_toolkit.capture import Inputs
from compile_toolkit.errors import CtkError, VerificationError


def outputs_of(fn: Callable, inputs: Sequence[Inputs]) -> list[list[torch.Tensor]]:
    with torch.inference_mode():
        return [[t.detach().clone() for t in tree_leaves(fn(*x)) if isinstance(t, torch.Tensor)] for x in inputs]


def relative_error(reference: list[list[torch.Tensor]], candidate: list[list[torch.Tensor]]) -> float:
    """max |a - b| / max |a| over all outputs: scale-free, so one tolerance fits every model.

    Non-finite values must match exactly: a NaN or infinity where the reference has a number (or
    a different non-finite value) is an infinite error, never a silent 0 (``max(0.0, nan)`` is
    0.0). Matching NaNs and infinities count as equal; the scale is the largest finite value."""
    worst = 0.0
    for ref_outs, cand_outs in zip(reference, candidate, strict=True):
        for ref, cand in zip(ref_outs, cand_outs, strict=True):
            if ref.shape != cand.shape:
                return float("inf")
            if ref.numel():
                worst = max(worst, _relative_error(ref.double(), cand.double()))
    return worst


def _relative_error(ref: torch.Tensor, cand: torch.Tensor) -> float:
    finite = ref.isfinite()
    same = (ref == cand) | (ref.isnan() & cand.isnan())
    if not bool((finite | same).all()) or not bool(cand[finite].isfinite().all()):
        return float("inf")
    if not bool(finite.any()):
        return 0.0
    scale = ref[finite].abs().max().item()
    diff = (ref[finite] - cand[finite]).abs().max().item()
    return diff / max(scale, 1e-12)


def check_close(
    reference: list[list[torch.Tensor]], candidate: Callable, inputs: Sequence[Inputs], rtol: float, what: str
) -> tuple[float, list[list[torch.Tensor]]]:
    """Raise :class:`VerificationError` naming ``what`` when ``candidate`` drifts from ``reference``;
    else the error and ``candidate``'s outputs (the reference for whatever runs on it next)."""
    outputs = outputs_of(candidate, inputs)
    error = relative_error(reference, outputs)
    if not error <= rtol:
        raise VerificationError(f"{what} changed the model's outputs: max relative error {error:.3g} > {rtol:g}")
    return error, outputs


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
