"""What every data source produces: a training and a validation split, as map-style data sets."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.utils.data import Dataset


@dataclass(frozen=True)
class DataSplits:
    """``train`` and ``val`` yield ``(inputs, target)`` pairs (images and labels) or dicts of
    tensors (tokenized text: ``input_ids``, ``attention_mask``, ``labels``). ``classes`` names the
    labels of a classification set, in label order; ``None`` for language modelling."""

    name: str
    train: Dataset
    val: Dataset
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None
