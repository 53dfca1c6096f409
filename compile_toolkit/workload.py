"""A workload: the user's model together with their data and task, as the jobs consume it.

``--data`` is the built-in digits set (``digits``, the default), the built-in ``pydoc`` text
(training and held-out parts, and a calibration part for pruning), an image folder, text files
(``.txt``/``.jsonl``/``.csv``/``.parquet``, or a folder of them, tokenized with the model's
tokenizer: an ``hf:`` folder's or a GGUF decoder's) or ``file.py:factory`` returning ``(train_dataset, val_dataset)``:
each kind is a :class:`DataSource` of :data:`DATA_SOURCES` (a new kind is one entry and its loader). Each ends up
the same shape here: data splits, a :class:`~compile_toolkit.tasks.Task`, example inputs drawn
from the real validation split, and one way to measure the task's metric on a module or on an
exported ONNX file. The jobs never ask which data set they hold. Every check that can fail on the
user's data runs here, before any heavy work, so a bad input is one line and nothing written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data import Dataset as TorchDataset

from .capture import eval_mode
from .data.images import class_names, image_folder, model_preprocessing
from .data.splits import DataSplits
from .data.text import READERS, text_files
from .errors import CtkError, summary
from .models import LoadedModel, load_digits_dataset, load_model
from .models.digits import Dataset
from .models.factory import call_factory, is_factory_spec
from .models.hf_specs import default_task, hf_folder, hf_tokenizer, is_gguf_spec
from .models.registry import DEFAULT_SPEC, parse_input_shape
from .tasks import Classify, Task, model_inputs, task_named

EXAMPLE_BATCH = 8
CALIBRATION_SAMPLES = 512  # batch-norm re-estimation after pruning
TOKEN_CALIBRATION_SAMPLES = 128  # sequences calibrating language-model pruning unless told (fewer if fewer)
DEFAULT_SEQ_LEN = 128
DIGITS = "digits"
PYDOC = "pydoc"  # Python's own pydoc_data.topics as text (compile_toolkit.llm.data)


@dataclass
class Workload:
    """Data splits, the task on them, and the batch size to read them in."""

    splits: DataSplits
    task: Task
    batch_size: int = 64
    calibration: TorchDataset | None = None  # a part set aside to calibrate pruning (pydoc's); else the training split

    def val_loader(self, batch_size: int | None = None, drop_last: bool = False) -> DataLoader:
        return DataLoader(self.splits.val, batch_size=batch_size or self.batch_size, drop_last=drop_last)

    def evaluate(self, module: nn.Module, reference: nn.Module | None = None) -> float:
        """The task's metric on the validation split (``embed`` compares with ``reference``, the dense model)."""
        return self.task.evaluate(module, self.val_loader(), reference)[self.task.metric]

    def calibration_inputs(self, samples: int = CALIBRATION_SAMPLES) -> Iterator[tuple[torch.Tensor, ...]]:
        """Model inputs of the training split, in order, ``samples`` at most (no labels used), as
        positional tuples: images, or the token tensors in the data set's order (``input_ids``,
        ``attention_mask``: the order the ``hf:`` wrappers and their ONNX files take them in)."""
        seen = 0
        for batch in DataLoader(self.splits.train, batch_size=self.batch_size):
            if seen >= samples:
                return
            inputs = positional(batch)
            seen += len(inputs[0])
            yield inputs


    def token_batches(self, samples: int | None = None) -> list[torch.Tensor]:
        """The first ``samples`` token sequences of the calibration part (or the training split),
        as ``[batch, tokens]`` id tensors: what language-model pruning calibrates on. ``None``:
        :data:`TOKEN_CALIBRATION_SAMPLES`, or all there are when there are fewer."""
        source = self.calibration if self.calibration is not None else self.splits.train
        if samples is None:
            samples = min(TOKEN_CALIBRATION_SAMPLES, len(source))
        elif samples > len(source):
            part = "calibration part" if self.calibration is not None else "training split"
            raise CtkError(f"--calibration-samples {samples} is more than the {len(source)} sequences of the "
                           f"{part} of {self.splits.name}")
        ids = torch.stack([source[i]["input_ids"] for i in range(samples)])
        return list(ids.split(self.batch_size))


def positional(batch: Any) -> tuple[torch.Tensor, ...]:
    """A batch's model inputs as one positional tuple (what capture and the exporters take)."""
    args, kwargs = model_inputs(batch)
    return (*args, *kwargs.values())


def digits_workload(dataset: Dataset) -> Workload:
    """The built-in digits split as a workload: its test part is the validation split."""
    splits = DataSplits(dataset.name, TensorDataset(dataset.x_train, dataset.y_train),
                        TensorDataset(dataset.x_test, dataset.y_test),
                        classes=[str(c) for c in range(dataset.num_classes)])
    return Workload(splits, Classify(dataset.num_classes))


def load_workload(model: str, data: str | None, weights: str | None = None,
                  input_shape: tuple[int, ...] | str | None = None, batch_size: int = 64,
                  task: str | None = None, *, seq_len: int = DEFAULT_SEQ_LEN, text_column: str = "text",
                  label_column: str = "label") -> tuple[LoadedModel, Workload | None]:
    """The model, and the workload of ``data`` (see the module docstring) for ``task`` (default:
    what the model was saved for, else classification).

    With data, the model is sized for it (one output per class), its example inputs become a real
    validation batch, so everything measured afterwards (FLOPs, latency, verification) sees real
    inputs, and its output is checked to fit the task. Without data a model with no built-in
    data set gets no workload (``None``): it can be stripped and exported, not measured.
    """
    if task is not None:
        task_named(task)  # an unknown name is an error before anything loads
    shape = parse_input_shape(input_shape) if isinstance(input_shape, str) else input_shape
    if data is None and is_gguf_spec(model):
        data = PYDOC  # a GGUF decoder brings its tokenizer, and text is at hand
    request = DataRequest(model, data, weights, shape, batch_size, task, seq_len, text_column, label_column)
    source = next(source for source in DATA_SOURCES if source.matches(data))
    return source.load(request)


@dataclass(frozen=True)
class DataRequest:
    """The model to load with the data (``data`` as the user wrote it; None: the model's default)
    and the options every data source may read."""

    model: str
    data: str | None
    weights: str | None
    shape: tuple[int, ...] | None
    batch_size: int
    task: str | None
    seq_len: int = DEFAULT_SEQ_LEN
    text_column: str = "text"
    label_column: str = "label"


@dataclass(frozen=True)
class DataSource:
    """A kind of ``--data``: ``matches(data)`` recognises it (sources are tried in order, the last
    takes the rest), ``load(request)`` gives the model sized for it and its workload."""

    form: str
    matches: Callable[[str | None], bool]
    load: Callable[[DataRequest], tuple[LoadedModel, Workload | None]]


def _is_text(path: Path) -> bool:
    """A text file, or a folder of text files that is not an image folder (no ``train/`` folder)."""
    if path.is_file():
        return True
    return path.is_dir() and not (path / "train").is_dir() and any(p.suffix.lower() in READERS for p in path.rglob("*"))


def _digits(r: DataRequest) -> tuple[LoadedModel, Workload | None]:
    """The built-in digits: the default data of digits-resnet (no workload for another model
    without ``--data``), or ``--data digits`` for any model that takes ``[N, 1, 8, 8]`` images."""
    model, data, weights, shape, task = r.model, r.data, r.weights, r.shape, r.task
    if task not in (None, "classify"):
        raise CtkError(f"--task {task} does not fit the digits data set (labelled images: --task classify)")
    if data is None:  # the model's default data: digits for digits-resnet, none for others
        loaded = load_model(model, weights, shape)
        if model != DEFAULT_SPEC:
            return loaded, None
        digits = load_digits_dataset()
    else:
        digits = load_digits_dataset()
        loaded = load_model(model, weights, shape or (EXAMPLE_BATCH, *digits.x_test.shape[1:]),
                            num_classes=None if model == DEFAULT_SPEC else digits.num_classes)
    work = digits_workload(digits)
    work.batch_size = r.batch_size
    _check_sizes(work.splits, r.batch_size, data or DIGITS)
    return loaded, work


def _images(r: DataRequest) -> tuple[LoadedModel, Workload]:
    """An image folder: a ``torchvision:``/``timm:`` classifier gets one output per class folder and
    the model's own preprocessing."""
    model, root, weights, shape, batch_size, task = r.model, Path(str(r.data)), r.weights, r.shape, r.batch_size, r.task
    if task not in (None, "classify"):
        raise CtkError(f"--task {task} does not fit --data {root}: an image folder is labelled images (--task classify)")
    classes = class_names(root)
    loaded = load_model(model, weights, shape, num_classes=len(classes))
    splits = image_folder(root, model_preprocessing(loaded.module, shape))
    return _workload(loaded, splits, Classify(len(classes)), batch_size, shape, str(root))


def _text(r: DataRequest) -> tuple[LoadedModel, Workload]:
    """Text tokenized with the model's own tokenizer, shaped for the task."""
    model, path, weights, seq_len, text_column, label_column = (r.model, Path(str(r.data)), r.weights, r.seq_len,
                                                                r.text_column, r.label_column)
    task = r.task or default_task(model) or "classify"
    if model.startswith("hf:"):  # tokenized first: a classifier is sized for the labels found
        splits = text_files(path, _hf_tokenizer(model, str(path)), task, seq_len, text_column, label_column)
        loaded = load_model(model, weights, None, num_classes=splits.num_classes, task=task)
    else:
        loaded = _text_model(model, weights, task, str(path))
        splits = text_files(path, loaded.tokenizer, task, seq_len, text_column, label_column)
    return _workload(loaded, splits, task_named(task, splits.num_classes), r.batch_size, r.shape, str(path))


def _pydoc(r: DataRequest) -> tuple[LoadedModel, Workload]:
    """The built-in ``pydoc`` text (:mod:`compile_toolkit.llm.data`): training and held-out parts
    as the splits, its calibration part set aside for pruning."""
    from .llm.data import pydoc_rows

    task = r.task or default_task(r.model) or "causal-lm"
    if task != "causal-lm":
        raise CtkError(f"--task {task} does not fit --data {PYDOC}: it is plain text for --task causal-lm")
    loaded = _text_model(r.model, r.weights, task, PYDOC)
    rows = pydoc_rows(loaded.tokenizer, r.seq_len)
    loaded, work = _workload(loaded, DataSplits(PYDOC, rows["train"], rows["heldout"]), task_named(task), r.batch_size,
                             r.shape, PYDOC)
    work.calibration = rows["calibration"]
    return loaded, work


def _hf_tokenizer(model: str, data: str) -> Any:
    tokenizer = hf_tokenizer(model)
    if tokenizer is None:
        raise CtkError(f"--model {model}: the folder {hf_folder(model)} has no tokenizer (tokenizer.json, "
                       f"tokenizer_config.json), and --data {data} is text to tokenize")
    return tokenizer


def _text_model(model: str, weights: str | None, task: str, data: str) -> LoadedModel:
    """A model that brings its tokenizer (``hf:`` folders, GGUF decoders), loaded for ``task``."""
    if model.startswith("hf:"):
        _hf_tokenizer(model, data)
    loaded = load_model(model, weights, None, task=task)
    if loaded.tokenizer is None:
        raise CtkError(f"--data {data} is text, tokenized with the model's tokenizer, and --model {model} brings "
                       "none: use an hf:<folder> model (its folder carries the tokenizer) or a GGUF decoder")
    return loaded


def _factory_data(r: DataRequest) -> tuple[LoadedModel, Workload]:
    """``file.py:factory`` returning ``(train_dataset, val_dataset)`` of the task's batches
    (``(inputs, label)`` pairs or dicts of tensors); a ``classes`` attribute on the training set
    sizes a classifier."""
    model, spec, weights, shape, batch_size, task = r.model, str(r.data), r.weights, r.shape, r.batch_size, r.task
    made = call_factory(spec, "data")
    if not (isinstance(made, tuple) and len(made) == 2 and all(_is_dataset(d) for d in made)):
        raise CtkError(f"--data {spec} returned {type(made).__name__}; it must return (train_dataset, val_dataset), "
                       "map-style data sets (__len__ and __getitem__)")
    classes = getattr(made[0], "classes", None)
    classes = [str(c) for c in classes] if classes is not None else None
    example = positional(next(iter(DataLoader(made[1], batch_size=EXAMPLE_BATCH)))) if len(made[1]) else None
    images = example is not None and example[0].is_floating_point() and not model.startswith("hf:")
    loaded = load_model(model, weights, shape or (tuple(example[0].shape) if images else None),
                        num_classes=len(classes) if classes else None, task=task)
    name = task or loaded.task or "classify"
    splits = DataSplits(Path(spec.rpartition(":")[0]).stem, made[0], made[1], classes)
    return _workload(loaded, splits, task_named(name, splits.num_classes), batch_size, shape, spec)


DATA_SOURCES: tuple[DataSource, ...] = (
    DataSource(f"{DIGITS} (digits-resnet's default)", lambda data: data is None or data == DIGITS, _digits),
    DataSource("file.py:factory", lambda data: is_factory_spec(str(data)), _factory_data),
    DataSource(PYDOC, lambda data: data == PYDOC, _pydoc),
    DataSource("text files (.txt/.jsonl/.csv/.parquet or a folder of them)", lambda data: _is_text(Path(str(data))),
               _text),
    DataSource("an image folder (train/ and val/ of class folders)", lambda data: True, _images),
)


def _is_dataset(value: object) -> bool:
    return hasattr(value, "__len__") and hasattr(value, "__getitem__")


def _workload(loaded: LoadedModel, splits: DataSplits, task: Task, batch_size: int,
              shape: tuple[int, ...] | None, data: str) -> tuple[LoadedModel, Workload]:
    """The workload of ``splits``, and ``loaded`` with a real validation batch as its example inputs
    (``--input-shape``'s batch size, else :data:`EXAMPLE_BATCH`), checked to fit ``task``."""
    _check_sizes(splits, batch_size, data)
    work = Workload(splits, task, batch_size)
    example = positional(next(iter(work.val_loader(shape[0] if shape else EXAMPLE_BATCH))))
    loaded = replace(loaded, example_inputs=example)
    _check_fits(loaded, task, data)
    return loaded, work


def _check_sizes(splits: DataSplits, batch_size: int, data: str) -> None:
    if len(splits.val) == 0:
        raise CtkError(f"--data {data} has an empty validation split: nothing to measure the model on")
    if batch_size > len(splits.train):
        raise CtkError(f"--batch-size {batch_size} is larger than the training split of --data {data} "
                       f"({len(splits.train)} samples)")


def _check_fits(loaded: LoadedModel, task: Task, data: str) -> None:
    """Run one validation batch, so a model that cannot take the data, or whose output is not what
    the task reads, fails here in one line instead of after pruning."""
    try:
        with eval_mode(loaded.module), torch.no_grad():
            outputs = loaded.module(*loaded.example_inputs)
    except Exception as exc:  # the user's model on the user's data: theirs to see, in one line
        shapes = ", ".join(str(list(t.shape)) for t in loaded.example_inputs)
        raise CtkError(f"--model {loaded.name} cannot run a batch of --data {data} (inputs {shapes}): "
                       f"{summary(exc)}") from exc
    problem = task.output_problem(outputs, loaded.example_inputs)
    if problem:
        raise CtkError(f"--task {task.name} does not fit --model {loaded.name}: {problem}")


class PositionalInputs(nn.Module):
    """``module`` called with a tokenized batch's tensors by position, in the batch's order (the
    order :func:`positional` made the example inputs in): a GraphModule from ``torch.export``, such
    as the stripped model, takes no keyword arguments."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs: torch.Tensor, **named: torch.Tensor) -> Any:
        return self.module(*inputs, *named.values())


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by ONNX Runtime behind a module's call, so the task measures the artifact
    with the same code it measures PyTorch modules with. Inputs come by position or by the ONNX
    input's name (a tokenized batch: ``input_ids=..., attention_mask=...``)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        from .metrics import default_threads
        from .onnx_runtime import session

        self.path = Path(path)
        self.session = session(str(path), threads=default_threads())
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs: torch.Tensor, **named: torch.Tensor) -> torch.Tensor:
        given = {**dict(zip(self.names, inputs, strict=False)), **named}  # too many inputs: refused below
        if len(inputs) > len(self.names) or set(given) != set(self.names):
            raise CtkError(f"{self.path.name} takes inputs ({', '.join(self.names)}); the batch has "
                           f"{len(inputs)} positional and ({', '.join(named)}) named")
        feeds = {name: given[name].detach().cpu().numpy() for name in self.names}
        return torch.from_numpy(self.session.run(None, feeds)[0])
