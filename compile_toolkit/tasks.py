"""Tasks: what a batch feeds the model, the training loss, and the metric a user of the task reads.

- ``classify``: cross-entropy; top-1 accuracy (and top-5 with more than five classes).
- ``causal-lm``: next-token cross-entropy; perplexity, ``exp`` of the mean loss per predicted token.
- ``embed``: mean-pooled hidden states; mean cosine similarity to the dense model's embeddings
  (there are no labels: the dense model is the reference), and for training ``1 - cosine``.

Batches are ``(inputs, labels)`` pairs (image folders, digits) or dicts of tensors (tokenized
text); model outputs are tensors or Hugging Face output objects, whose ``logits`` or
``last_hidden_state`` is read. Distillation from the dense model (:func:`distillation_loss`) is
the same for every task that has logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .capture import eval_mode
from .errors import CtkError

TASKS = ("classify", "causal-lm", "embed")
Batch = Any


def model_inputs(batch: Batch) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(args, kwargs)`` to call the model with: the images of a pair, or the token tensors of a
    dict (everything but ``labels``, which the task reads itself)."""
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k != "labels"}
    return (batch[0],), {}


def labels_of(batch: Batch) -> torch.Tensor:
    return batch["labels"] if isinstance(batch, dict) else batch[1]


def logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        logits = outputs[0]
    if logits is None:
        raise CtkError(f"the model returns {type(outputs).__name__}, which holds no logits for this task")
    return logits


def embeddings_of(outputs: Any, batch: Batch) -> torch.Tensor:
    """Mean of the last hidden states over the real (unpadded) tokens, as sentence-transformers do."""
    hidden = getattr(outputs, "last_hidden_state", outputs if isinstance(outputs, torch.Tensor) else None)
    if hidden is None or hidden.dim() != 3:
        raise CtkError("the embed task needs a model that returns hidden states [batch, tokens, features]")
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


@dataclass(frozen=True)
class Task:
    """One of :data:`TASKS`; ``num_classes`` for ``classify`` (checked against the model's output)."""

    name: str
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise CtkError(f"--task {self.name!r} is not one of {', '.join(TASKS)}")

    @property
    def metric(self) -> str:
        return {"classify": "top1", "causal-lm": "perplexity", "embed": "cosine"}[self.name]

    @property
    def higher_is_better(self) -> bool:
        return self.name != "causal-lm"

    def loss(self, outputs: Any, batch: Batch, reference: Any = None) -> torch.Tensor:
        """The training loss; ``embed`` needs the dense model's ``reference`` outputs."""
        if self.name == "embed":
            if reference is None:
                raise CtkError("the embed task trains against the dense model's embeddings; give it a teacher")
            return 1 - F.cosine_similarity(embeddings_of(outputs, batch), embeddings_of(reference, batch)).mean()
        logits, labels = logits_of(outputs), labels_of(batch)
        if self.name == "causal-lm":
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        self._check_logits(logits)
        return F.cross_entropy(logits, labels)

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], reference: nn.Module | None = None) -> dict[str, float]:
        """The metric over ``batches`` (eval mode, no gradients): ``{metric: value, "loss": ...}``
        plus ``top5`` for classification with more than five classes."""
        meter = _Meter()
        with eval_mode(model), eval_mode(reference or nn.Identity()), torch.no_grad():
            for batch in batches:
                args, kwargs = model_inputs(batch)
                outputs = model(*args, **kwargs)
                dense = reference(*args, **kwargs) if reference is not None and self.name == "embed" else None
                self._accumulate(meter, outputs, batch, dense)
        return meter.result(self)

    def _accumulate(self, meter: _Meter, outputs: Any, batch: Batch, dense: Any) -> None:
        if self.name == "embed":
            if dense is None:
                raise CtkError("the embed task's metric compares with the dense model: give the reference model")
            cosine = F.cosine_similarity(embeddings_of(outputs, batch), embeddings_of(dense, batch))
            meter.add("cosine", float(cosine.sum()), len(cosine))
            return
        logits, labels = logits_of(outputs), labels_of(batch)
        if self.name == "causal-lm":
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")
            meter.add("loss", float(nll), labels[:, 1:].numel())
            return
        self._check_logits(logits)
        meter.add("loss", float(F.cross_entropy(logits.float(), labels, reduction="sum")), len(labels))
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        meter.add("top1", float((top[:, 0] == labels).sum()), len(labels))
        if logits.shape[-1] > 5:
            meter.add("top5", float((top == labels[:, None]).any(dim=-1).sum()), len(labels))

    def output_problem(self, outputs: Any, inputs: tuple[torch.Tensor, ...]) -> str:
        """Why ``outputs`` (of the model on ``inputs``) are not what this task reads; empty when
        they are: checked once on a real batch, so a mismatch fails before any training."""
        found = getattr(outputs, "logits", getattr(outputs, "last_hidden_state", outputs))
        shape = list(found.shape) if isinstance(found, torch.Tensor) else type(outputs).__name__
        batch = inputs[0].shape[0]
        if self.name == "classify":
            want = self.num_classes or "classes"
            fits = isinstance(found, torch.Tensor) and found.dim() == 2 and found.shape[0] == batch and (
                self.num_classes is None or found.shape[1] == self.num_classes)
            need = f"logits [batch, {want}]"
        else:
            tokens = inputs[0].shape[1] if inputs[0].dim() == 2 else None
            fits = isinstance(found, torch.Tensor) and found.dim() == 3 and tokens is not None and (
                tuple(found.shape[:2]) == (batch, tokens))
            need = "logits [batch, tokens, vocabulary]" if self.name == "causal-lm" else "hidden states [batch, tokens, features]"
            need += " of token-id inputs [batch, tokens]"
        return "" if fits else f"it returns {shape}, and {self.name} needs {need}"

    def _check_logits(self, logits: torch.Tensor) -> None:
        if logits.dim() != 2 or (self.num_classes is not None and logits.shape[-1] != self.num_classes):
            raise CtkError(f"the model returns logits of shape {list(logits.shape)}; the data has "
                           f"{self.num_classes} classes, so classification needs [batch, {self.num_classes}]")


class _Meter:
    """Sums and counts per quantity, so a metric over many batches weighs every sample once."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, total: float, count: int) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0) + count

    def result(self, task: Task) -> dict[str, float]:
        if not self.counts:
            raise CtkError("the validation split is empty: nothing to measure")
        means = {name: self.sums[name] / self.counts[name] for name in self.sums}
        if task.name == "causal-lm":
            means["perplexity"] = math.exp(means["loss"])
        return means


def distillation_loss(student: Any, teacher: Any, temperature: float = 2.0) -> torch.Tensor:
    """Hinton et al.'s soft-target loss: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``,
    averaged over every predicted position (samples, or tokens of a language model)."""
    if temperature <= 0:
        raise CtkError(f"--distill-temperature must be positive, got {temperature}")
    s, t = logits_of(student), logits_of(teacher).detach()
    s, t = s.flatten(0, -2) / temperature, t.flatten(0, -2) / temperature
    return F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True,
                    reduction="batchmean") * temperature**2
