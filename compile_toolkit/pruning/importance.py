"""Importance criteria of structured pruning, registered by name.

A criterion is one function from a :class:`ScoreContext` to a score per channel of the channel
analysis (higher: keep) and whether it scores that channel at all; ``ctk.prune`` zeros the
lowest-scoring channels of each group. A new criterion is one decorated function::

    @register_importance("my_score", calibration=("batches",))
    def my_score(ctx: ScoreContext) -> Scores: ...

``calibration`` says what the criterion needs from ``ctk.prune(..., calibration=...)``: ``loss``
(a function that runs the model on calibration data and returns a scalar loss), ``batches`` (an
iterable of model-input batches: tuples of tensors, or tensors for one-input models; no labels),
or nothing.

Built in: ``l1``, ``l2`` and ``bn_scale`` (weights only), ``random``, ``taylor`` (a loss), and the
two that measure what a channel does on data, for pretrained models where weight magnitude says
little about it: ``ablation`` (the exact output change when the channel alone is zeroed) and
``mask_gradient`` (the gradient through a gate that multiplies the channel where it is read,
Michel et al. 2019). See docs/pruning.md for when each wins.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..channels import ChannelAnalysis
from ..errors import CtkError
from .channel_groups import Slices, channel_scores

Scores = tuple[np.ndarray, np.ndarray]  # (score per channel, whether the criterion scores it)
Loss = Callable[[nn.Module], torch.Tensor]  # runs the model on calibration data, returns a scalar loss
Batch = tuple[torch.Tensor, ...] | torch.Tensor  # one calibration batch: its inputs, or the one input
Calibration = Loss | Iterable[Batch]
CALIBRATION_KINDS = {
    "loss": "a function that runs the model on a batch and returns its loss",
    "batches": "an iterable of model-input batches (tuples of tensors)",
}


@dataclass(frozen=True)
class ScoreContext:
    """What a criterion may read. ``candidates`` are the channels the structure may prune: a
    criterion that pays per channel (``ablation``) scores only those."""

    model: nn.Module
    analysis: ChannelAnalysis
    params: dict[str, torch.Tensor]
    slices: Slices
    candidates: np.ndarray
    seed: int
    calibration: Calibration | None

    @property
    def count(self) -> int:
        return self.analysis.components.count


@dataclass(frozen=True)
class Criterion:
    """A registered importance: its scoring function and the calibration kinds it accepts
    (empty: none needed)."""

    name: str
    score: Callable[[ScoreContext], Scores]
    calibration: tuple[str, ...]

    def check(self, calibration: Calibration | None) -> None:
        """Refuse a call without the calibration this criterion needs, naming what it takes."""
        if not self.calibration or _calibration_kind(calibration) in self.calibration:
            return
        wanted = " or ".join(CALIBRATION_KINDS[k] for k in self.calibration)
        raise CtkError(f"importance={self.name!r} needs calibration: {wanted}")


_REGISTRY: dict[str, Criterion] = {}


def register_importance(name: str, *, calibration: tuple[str, ...] = ()) -> Callable:
    """Decorator: register ``fn(ctx) -> (scores, scored)`` as ``importance=name``."""
    unknown = [k for k in calibration if k not in CALIBRATION_KINDS]
    if unknown:
        raise CtkError(f"register_importance({name!r}): unknown calibration kind {unknown[0]!r}; "
                       f"choose from {', '.join(CALIBRATION_KINDS)}")

    def register(fn: Callable[[ScoreContext], Scores]) -> Callable[[ScoreContext], Scores]:
        if name in _REGISTRY:
            raise CtkError(f"importance {name!r} is already registered")
        _REGISTRY[name] = Criterion(name, fn, tuple(calibration))
        return fn

    return register


def importance_criterion(name: str) -> Criterion:
    """The criterion registered as ``name``; an unknown name is an error listing the valid ones."""
    if name not in _REGISTRY:
        raise CtkError(f"unknown importance {name!r}; choose from {', '.join(importance_names())}")
    return _REGISTRY[name]


def importance_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _calibration_kind(calibration: Calibration | None) -> str | None:
    if callable(calibration):
        return "loss"
    if calibration is not None and isinstance(calibration, Iterable) and not isinstance(calibration, torch.Tensor):
        return "batches"
    return None


# -- weights only ----------------------------------------------------------------------------------
def _weight_scores(ctx: ScoreContext, value: Callable[[str], torch.Tensor | None], normalise: bool) -> Scores:
    scores, scored = channel_scores(ctx.slices, value, ctx.count, normalise=normalise, dtype=torch.float64)
    return scores.numpy(), scored.numpy()


@register_importance("l1")
def l1(ctx: ScoreContext) -> Scores:
    """Weight magnitude of every slice carrying the channel, each parameter normalised by its mean."""
    return _weight_scores(ctx, lambda name: ctx.params[name].detach().abs().double(), normalise=True)


@register_importance("l2")
def l2(ctx: ScoreContext) -> Scores:
    """Squared weights, normalised like ``l1``."""
    return _weight_scores(ctx, lambda name: ctx.params[name].detach().double() ** 2, normalise=True)


@register_importance("random")
def random(ctx: ScoreContext) -> Scores:
    """Seeded uniform scores: the baseline every criterion must beat."""
    return np.random.default_rng(ctx.seed).random(ctx.count), np.ones(ctx.count, dtype=bool)


@register_importance("bn_scale")
def bn_scale(ctx: ScoreContext) -> Scores:
    """``|gamma|`` of the batch norms carrying the channel (network slimming); channels no batch
    norm carries are not scored, so not pruned."""
    scales = {f"{prefix}.weight" if prefix else "weight" for prefix, m in ctx.model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}
    return _weight_scores(ctx, lambda name: ctx.params[name].detach().abs().double() if name in scales else None,
                          normalise=False)


# -- a loss --------------------------------------------------------------------------------------
@register_importance("taylor", calibration=("loss",))
def taylor(ctx: ScoreContext) -> Scores:
    """``|sum(grad * weight)|`` over every slice carrying the channel (Molchanov et al. 2019): the
    first-order loss change when the channel is zeroed; the signed sum, then its size."""
    terms = _grad_times_weight(ctx, lambda model: _checked_loss(ctx.calibration(model)))
    scores, scored = _weight_scores(ctx, terms.get, normalise=False)
    return np.abs(scores), scored


def _checked_loss(loss: object) -> torch.Tensor:
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
        raise CtkError("calibration must return a scalar loss tensor that depends on the model's parameters")
    return loss


def _grad_times_weight(ctx: ScoreContext, loss: Loss, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """``grad * weight`` per parameter of ``names`` (default: all scored ones), from one loss. The
    model runs in eval mode so calibration leaves batch-norm statistics alone; gradients are
    returned, never stored on the model."""
    own = dict(ctx.model.named_parameters())
    names = [n for n in (ctx.params if names is None else names) if n in own]
    with _eval(ctx.model), torch.enable_grad():
        grads = torch.autograd.grad(loss(ctx.model), [own[n] for n in names], allow_unused=True)
    return {n: (g.detach().double() * own[n].detach().double()).cpu()
            for n, g in zip(names, grads, strict=True) if g is not None}


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Run a block with the model in eval mode, restoring its mode after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


# -- data: what a channel does to the outputs -------------------------------------------------------
@register_importance("ablation", calibration=("loss", "batches"))
def ablation(ctx: ScoreContext) -> Scores:
    """Exact: how much the calibration loss grows when the channel alone is zeroed in every slice
    that carries it (with input batches: the squared distance of the outputs from the unpruned
    model's, relative to their size). One calibration pass per candidate channel: affordable for
    attention heads and a few dozen groups, not for thousands of neurons."""
    measure = _measure(ctx)
    base = measure()
    scores, scored = np.zeros(ctx.count), np.zeros(ctx.count, dtype=bool)
    own = dict(ctx.model.named_parameters())
    for channel, places in _places(ctx.slices, ctx.candidates).items():
        with _zeroed([(own[name], d, index.to(own[name].device)) for name, d, index in places if name in own]):
            scores[channel] = measure() - base
        scored[channel] = True
    return scores, scored


@register_importance("mask_gradient", calibration=("loss", "batches"))
def mask_gradient(ctx: ScoreContext) -> Scores:
    """The gradient through a gate of 1 that multiplies the channel where it is read (the input
    dim of the Linear and convolution weights after it; for a head, the output projection's
    columns), as Michel et al. 2019 score heads. With a loss: ``|dL/dgate|``. With input batches
    and no labels the distance to the unpruned outputs has zero gradient there, so the score is
    the squared gradient of the outputs themselves, ``sum of (d <z, f(x)> / dgate)^2``
    over the examples, with a seeded Gaussian probe ``z`` per example: in expectation
    ``||df/dgate||^2``, the second-order estimate of the squared output change when the channel
    is removed. One backward pass per example. Channels no Linear or convolution reads are not
    scored (kept)."""
    gates = _read_slices(ctx.model, ctx.slices)
    if len(ctx.candidates) and not _read_channels(gates, ctx.count)[ctx.candidates].any():
        raise CtkError("importance mask_gradient gates channels where a Linear or convolution layer reads them, "
                       "and no such layer reads the channels being pruned; use --importance taylor or l1")
    if callable(ctx.calibration):
        terms = _grad_times_weight(ctx, lambda model: _checked_loss(ctx.calibration(model)), gates)
        scores, scored = channel_scores(gates, terms.get, ctx.count, normalise=False, dtype=torch.float64)
        return scores.abs().numpy(), scored.numpy()
    generator = torch.Generator().manual_seed(ctx.seed)
    total = torch.zeros(ctx.count, dtype=torch.float64)
    for example in _examples(_batches(ctx.calibration)):
        terms = _grad_times_weight(ctx, lambda model, x=example: _probe(_outputs(model, x), generator), gates)
        total += channel_scores(gates, terms.get, ctx.count, normalise=False, dtype=torch.float64)[0] ** 2
    return total.numpy(), _read_channels(gates, ctx.count)


def _examples(batches: list[tuple[torch.Tensor, ...]]) -> Iterator[tuple[torch.Tensor, ...]]:
    """Each batch split into its examples along the first dim, when every input has that dim
    with one size (else the batch whole). One probe of a batch of B examples mixes them, so its
    square is a single noisy sample; one probe per example gives B independent ones for the same
    work (all-MiniLM-L6-v2, 30% of heads, mean cosine to dense: 0.900 with one probe per
    16-sentence batch, 0.921 with one per sentence)."""
    for batch in batches:
        sizes = {t.shape[0] if isinstance(t, torch.Tensor) and t.dim() else None for t in batch}
        if len(sizes) == 1 and None not in sizes:
            yield from (tuple(t[i:i + 1] for t in batch) for i in range(sizes.pop()))
        else:
            yield batch


def _read_channels(gates: Slices, count: int) -> np.ndarray:
    """Whether a gate slice reads each channel."""
    scored = np.zeros(count, dtype=bool)
    for dims in gates.values():
        for _, ids in dims:
            scored[ids.numpy()] = True
    return scored


def _batches(calibration: Iterable[Batch]) -> list[tuple[torch.Tensor, ...]]:
    batches = [b if isinstance(b, tuple) else tuple(b) if isinstance(b, list) else (b,) for b in calibration]
    if not batches:
        raise CtkError("calibration data is empty: give at least one batch")
    return batches


def _outputs(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The floating-point tensors among the model's outputs (any nesting of tuples and dicts)."""
    leaves = [t for t in tree_leaves(model(*batch)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise CtkError("calibration batches: the model returns no floating-point tensor to compare")
    return leaves


def _probe(outputs: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """``<z, outputs>`` for a seeded standard normal ``z``: a scalar whose gradient is one random
    projection of the output's Jacobian."""
    return sum((torch.randn(o.shape, generator=generator, dtype=o.dtype).to(o.device) * o).sum() for o in outputs)


def _measure(ctx: ScoreContext) -> Callable[[], float]:
    """A no-gradient, eval-mode measurement of the model on the calibration data: the loss, or
    the relative squared distance of the outputs from those of the model as it is now."""
    model = ctx.model

    def run(fn: Callable[[], torch.Tensor | float]) -> float:
        with _eval(model), torch.no_grad():
            return float(fn())

    if callable(ctx.calibration):
        return lambda: run(lambda: ctx.calibration(model))
    batches = _batches(ctx.calibration)
    with _eval(model), torch.no_grad():
        reference = [_outputs(model, b) for b in batches]

    def distance() -> float:
        return sum(float(((o - r) ** 2).sum() / (r**2).sum().clamp(min=1e-30))
                   for b, refs in zip(batches, reference, strict=True)
                   for o, r in zip(_outputs(model, b), refs, strict=True))

    return lambda: run(distance)


def _places(slices: Slices, candidates: np.ndarray) -> dict[int, list[tuple[str, int, torch.Tensor]]]:
    """Candidate channel -> every (parameter, dim, indices along it) that carries it."""
    wanted = torch.as_tensor(candidates, dtype=torch.int64)
    places: dict[int, list[tuple[str, int, torch.Tensor]]] = {int(c): [] for c in candidates}
    for name, dims in slices.items():
        for d, ids in dims:
            for channel in torch.unique(ids[torch.isin(ids, wanted)]).tolist():
                places[channel].append((name, d, torch.nonzero(ids == channel).flatten()))
    return {c: p for c, p in places.items() if p}


@contextmanager
@torch.no_grad()
def _zeroed(places: list[tuple[torch.Tensor, int, torch.Tensor]]) -> Iterator[None]:
    """Zero ``(parameter, dim, indices)`` slices for a block and restore them exactly after."""
    saved = []
    try:
        for param, d, index in places:
            saved.append((param, d, index, param.index_select(d, index).clone()))
            param.index_fill_(d, index, 0)
        yield
    finally:
        for param, d, index, values in reversed(saved):
            param.index_copy_(d, index, values)


def _read_slices(model: nn.Module, slices: Slices) -> Slices:
    """The slices where a channel is read: the input dim of Linear and convolution weights
    (dim 1; dim 0 of transposed convolutions and of ``transformers``' ``Conv1D``, GPT-2's
    ``[in, out]`` linear layers). A gate there scales the channel exactly as the next layer sees
    it, which zeroing producer rows does not (attention logits, activations)."""
    read: Slices = {}
    for name, dims in slices.items():
        prefix, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue
        input_dim = _input_dim(module) if attr == "weight" else None
        kept = [(d, ids) for d, ids in dims if d == input_dim]
        if kept:
            read[name] = kept
    return read


def _input_dim(module: nn.Module) -> int | None:
    """The dim of ``module.weight`` that indexes its input channels, None for other layers."""
    if isinstance(module, nn.Linear):
        return 1
    if isinstance(module, nn.modules.conv._ConvNd):
        return 0 if module.transposed else 1
    hf_layers = sys.modules.get("transformers.pytorch_utils")  # loaded with any transformers model
    if hf_layers is not None and isinstance(module, hf_layers.Conv1D):
        return 0
    return None
