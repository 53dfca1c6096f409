"""A workload: the user's model together with their data and task, as the jobs consume it.

``ctk export --data folder`` and the built-in digits set end up the same shape here: data
splits, a :class:`~compile_toolkit.tasks.Task`, example inputs drawn from the real validation
images, and one way to measure the task's metric on a module or on an exported ONNX file. The
jobs never ask which data set they hold.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .data.images import class_names, image_folder, model_preprocessing
from .data.splits import DataSplits
from .data.text import READERS
from .errors import CtkError
from .models import LoadedModel, load_model
from .models.registry import parse_input_shape
from .models.digits import Dataset
from .tasks import Task, model_inputs

EXAMPLE_BATCH = 8
CALIBRATION_SAMPLES = 512  # batch-norm re-estimation after pruning


@dataclass
class Workload:
    """Data splits, the task on them, and the batch size to read them in."""

    splits: DataSplits
    task: Task
    batch_size: int = 64

    def val_loader(self, batch_size: int | None = None, drop_last: bool = False) -> DataLoader:
        return DataLoader(self.splits.val, batch_size=batch_size or self.batch_size, drop_last=drop_last)

    def evaluate(self, module: nn.Module, reference: nn.Module | None = None) -> float:
        """The task's metric on the validation split."""
        return self.task.evaluate(module, self.val_loader(), reference)[self.task.metric]

    def calibration_inputs(self, samples: int = CALIBRATION_SAMPLES) -> Iterator[tuple[torch.Tensor, ...]]:
        """Model inputs from the training split, in order, ``samples`` at most (no labels used)."""
        seen = 0
        for batch in DataLoader(self.splits.train, batch_size=self.batch_size):
            if seen >= samples:
                return
            args, kwargs = model_inputs(batch)
            if kwargs:
                raise CtkError("batch-norm re-estimation takes positional image batches, not token dicts")
            seen += len(args[0])
            yield args


def digits_workload(dataset: Dataset) -> Workload:
    """The built-in digits split as a workload: its test part is the validation split."""
    splits = DataSplits(dataset.name, TensorDataset(dataset.x_train, dataset.y_train),
                        TensorDataset(dataset.x_test, dataset.y_test),
                        classes=[str(c) for c in range(dataset.num_classes)])
    return Workload(splits, Task("classify", dataset.num_classes))


def load_workload(model: str, data: str | None, weights: str | None = None,
                  input_shape: tuple[int, ...] | str | None = None, batch_size: int = 64) -> tuple[LoadedModel, Workload | None]:
    """The model, and the workload of ``data`` (an image folder) or of the model's built-in data.

    With ``data``, a ``torchvision:``/``timm:`` classifier is built with one output per class
    folder, images are preprocessed the model's way, and the example inputs are real validation
    images, so everything measured afterwards (FLOPs, latency, verification) sees real inputs.
    """
    if data is None:
        loaded = load_model(model, weights, input_shape)
        return loaded, digits_workload(loaded.dataset) if loaded.dataset is not None else None
    root = Path(data)
    if root.is_file() or (root.is_dir() and not (root / "train").is_dir()
                          and any(p.suffix.lower() in READERS for p in root.rglob("*"))):
        raise CtkError(f"--data {root} is text; ctk export reads image folders (train/<class>/, val/<class>/) "
                       "for now, and text through the Python API (compile_toolkit.data.text)")
    classes = class_names(root)
    shape = parse_input_shape(input_shape) if isinstance(input_shape, str) else input_shape
    loaded = load_model(model, weights, shape, num_classes=len(classes))
    splits = image_folder(root, model_preprocessing(loaded.module, shape))
    work = Workload(splits, Task("classify", len(classes)), batch_size)
    batch = shape[0] if shape else EXAMPLE_BATCH
    images = next(iter(work.val_loader(batch)))[0]
    loaded.example_inputs = (images,)
    loaded.dataset = None
    return loaded, work


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by ONNX Runtime behind a module's call, so the task measures the artifact
    with the same code it measures PyTorch modules with."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        import onnxruntime

        from .metrics import default_threads

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = default_threads()
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.names, inputs, strict=True)}
        return torch.from_numpy(self.session.run(None, feeds)[0])
