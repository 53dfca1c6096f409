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
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .capture import eval_mode
from .errors import CtkError

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
    """What a model does with its data: the training loss and the metric a user reads. One class
    per task, registered by name (:data:`TASK_CLASSES`, :func:`task_named`): a new task is a
    subclass with its ``name``, ``metric``, :meth:`loss`, :meth:`_accumulate` and
    :meth:`output_problem`."""

    name: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = False  # no labels: the dense model's outputs are the target

    def loss(self, outputs: Any, batch: Batch, reference: Any = None) -> torch.Tensor:
        """The training loss; a task that ``needs_teacher`` reads the dense model's ``reference`` outputs."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], reference: nn.Module | None = None) -> dict[str, float]:
        """The metric over ``batches`` (eval mode, no gradients): ``{metric: value, "loss": ...}``
        plus ``top5`` for classification with more than five classes."""
        meter = _Meter()
        with eval_mode(model), eval_mode(reference or nn.Identity()), torch.no_grad():
            for batch in batches:
                args, kwargs = model_inputs(batch)
                outputs = model(*args, **kwargs)
                dense = reference(*args, **kwargs) if reference is not None and self.needs_teacher else None
                self._accumulate(meter, outputs, batch, dense)
        return self._finish(meter.means())

    def output_problem(self, outputs: Any, inputs: tuple[torch.Tensor, ...]) -> str:
        """Why ``outputs`` (of the model on ``inputs``) are not what this task reads; empty when
        they are: checked once on a real batch, so a mismatch fails before any training."""
        raise NotImplementedError

    def _accumulate(self, meter: _Meter, outputs: Any, batch: Batch, dense: Any) -> None:
        raise NotImplementedError

    def _finish(self, means: dict[str, float]) -> dict[str, float]:
        return means


@dataclass(frozen=True)
class Classify(Task):
    """Cross-entropy; top-1 accuracy (and top-5 with more than five classes). ``num_classes`` is
    checked against the model's output."""

    name: ClassVar[str] = "classify"
    metric: ClassVar[str] = "top1"
    num_classes: int | None = None

    def loss(self, outputs: Any, batch: Batch, reference: Any = None) -> torch.Tensor:
        logits = logits_of(outputs)
        self._check_logits(logits)
        return F.cross_entropy(logits, labels_of(batch))

    def output_problem(self, outputs: Any, inputs: tuple[torch.Tensor, ...]) -> str:
        found = _read_output(outputs)
        fits = isinstance(found, torch.Tensor) and found.dim() == 2 and found.shape[0] == inputs[0].shape[0] and (
            self.num_classes is None or found.shape[1] == self.num_classes)
        return "" if fits else _mismatch(outputs, self.name, f"logits [batch, {self.num_classes or 'classes'}]")

    def _accumulate(self, meter: _Meter, outputs: Any, batch: Batch, dense: Any) -> None:
        logits, labels = logits_of(outputs), labels_of(batch)
        self._check_logits(logits)
        meter.add("loss", float(F.cross_entropy(logits.float(), labels, reduction="sum")), len(labels))
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        meter.add("top1", float((top[:, 0] == labels).sum()), len(labels))
        if logits.shape[-1] > 5:
            meter.add("top5", float((top == labels[:, None]).any(dim=-1).sum()), len(labels))

    def _check_logits(self, logits: torch.Tensor) -> None:
        if logits.dim() != 2 or (self.num_classes is not None and logits.shape[-1] != self.num_classes):
            raise CtkError(f"the model returns logits of shape {list(logits.shape)}; the data has "
                           f"{self.num_classes} classes, so classification needs [batch, {self.num_classes}]")


@dataclass(frozen=True)
class CausalLM(Task):
    """Next-token cross-entropy; perplexity, ``exp`` of the mean loss per predicted token."""

    name: ClassVar[str] = "causal-lm"
    metric: ClassVar[str] = "perplexity"
    higher_is_better: ClassVar[bool] = False

    def loss(self, outputs: Any, batch: Batch, reference: Any = None) -> torch.Tensor:
        logits, labels = logits_of(outputs), labels_of(batch)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    def output_problem(self, outputs: Any, inputs: tuple[torch.Tensor, ...]) -> str:
        return "" if _per_token(outputs, inputs) else _mismatch(outputs, self.name, _PER_TOKEN.format("logits",
                                                                                                        "vocabulary"))

    def _accumulate(self, meter: _Meter, outputs: Any, batch: Batch, dense: Any) -> None:
        logits, labels = logits_of(outputs), labels_of(batch)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")
        meter.add("loss", float(nll), labels[:, 1:].numel())

    def _finish(self, means: dict[str, float]) -> dict[str, float]:
        return {**means, "perplexity": math.exp(means["loss"])}


@dataclass(frozen=True)
class Embed(Task):
    """Mean-pooled hidden states; mean cosine similarity to the dense model's embeddings (there are
    no labels: the dense model is the reference), and for training ``1 - cosine``."""

    name: ClassVar[str] = "embed"
    metric: ClassVar[str] = "cosine"
    needs_teacher: ClassVar[bool] = True

    def loss(self, outputs: Any, batch: Batch, reference: Any = None) -> torch.Tensor:
        if reference is None:
            raise CtkError("the embed task trains against the dense model's embeddings; give it a teacher")
        return 1 - F.cosine_similarity(embeddings_of(outputs, batch), embeddings_of(reference, batch)).mean()

    def output_problem(self, outputs: Any, inputs: tuple[torch.Tensor, ...]) -> str:
        return "" if _per_token(outputs, inputs) else _mismatch(outputs, self.name, _PER_TOKEN.format("hidden states",
                                                                                                        "features"))

    def _accumulate(self, meter: _Meter, outputs: Any, batch: Batch, dense: Any) -> None:
        if dense is None:
            raise CtkError("the embed task's metric compares with the dense model: give the reference model")
        cosine = F.cosine_similarity(embeddings_of(outputs, batch), embeddings_of(dense, batch))
        meter.add("cosine", float(cosine.sum()), len(cosine))


TASK_CLASSES: dict[str, type[Task]] = {cls.name: cls for cls in (Classify, CausalLM, Embed)}
TASKS = tuple(TASK_CLASSES)
_PER_TOKEN = "{} [batch, tokens, {}] of token-id inputs [batch, tokens]"


def task_named(name: str, num_classes: int | None = None) -> Task:
    """The task called ``name`` (``num_classes`` for classification); an unknown name is one line."""
    if name not in TASK_CLASSES:
        raise CtkError(f"--task {name!r} is not one of {', '.join(TASKS)}")
    return Classify(num_classes) if name == Classify.name else TASK_CLASSES[name]()


def _read_output(outputs: Any) -> Any:
    return getattr(outputs, "logits", getattr(outputs, "last_hidden_state", outputs))


def _per_token(outputs: Any, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``outputs`` hold one vector per input token: ``[batch, tokens, features]``."""
    found = _read_output(outputs)
    tokens = inputs[0].shape[1] if inputs[0].dim() == 2 else None
    return isinstance(found, torch.Tensor) and found.dim() == 3 and tokens is not None and (
        tuple(found.shape[:2]) == (inputs[0].shape[0], tokens))


def _mismatch(outputs: Any, task: str, need: str) -> str:
    found = _read_output(outputs)
    shape = list(found.shape) if isinstance(found, torch.Tensor) else type(outputs).__name__
    return f"it returns {shape}, and {task} needs {need}"


class _Meter:
    """Sums and counts per quantity, so a metric over many batches weighs every sample once."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, total: float, count: int) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0) + count

    def means(self) -> dict[str, float]:
        if not self.counts:
            raise CtkError("the validation split is empty: nothing to measure")
        return {name: self.sums[name] / self.counts[name] for name in self.sums}


def distillation_loss(student: Any, teacher: Any, temperature: float = 2.0) -> torch.Tensor:
    """Hinton et al.'s soft-target loss: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``,
    averaged over every predicted position (samples, or tokens of a language model)."""
    if temperature <= 0:
        raise CtkError(f"--distill-temperature must be positive, got {temperature}")
    s, t = logits_of(student), logits_of(teacher).detach()
    s, t = s.flatten(0, -2) / temperature, t.flatten(0, -2) / temperature
    return F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True,
                    reduction="batchmean") * temperature**2
