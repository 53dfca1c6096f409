"""Text data from local files: ``.txt``, ``.jsonl``, ``.csv`` or ``.parquet``, or a folder of them.

Files are read with the ``datasets`` library's packaged readers (no network: the readers ship in
the wheel) into a throw-away cache, tokenized with the model's tokenizer, and shaped for the task:

- ``causal-lm``: all text joined (end-of-text token between rows) and packed into fixed-length
  blocks; the last ``val_fraction`` of the blocks is held out, contiguous, so no validation block
  shares a sentence with a training block.
- ``classify``: ``(text, label)`` rows padded or cut to ``block_size`` tokens; labels may be names
  (mapped to ids in sorted order) or integers.
- ``embed``: the text rows alone (the metric compares embeddings with the dense model's).

A folder with ``train.*`` and ``val.*`` (or ``validation.*``) files uses them as the splits;
otherwise every file is read and split as above.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import CtkError, shown, summary
from ..tasks import TASKS
from .splits import DataSplits

READERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class TensorRows(Dataset):
    """Rows of equal-length tensors, one dict per item (what a DataLoader's default collate stacks)."""

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        lengths = {len(v) for v in columns.values()}
        assert len(lengths) == 1, lengths
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: column[index] for name, column in self.columns.items()}


def text_files(path: str | Path, tokenizer: Any, task: str, block_size: int = 128,
               text_column: str = "text", label_column: str = "label", val_fraction: float = 0.1) -> DataSplits:
    """Read, tokenize and split the text at ``path`` for ``task`` (see the module docstring)."""
    path = Path(path)
    if task not in TASKS:
        raise CtkError(f"--task {task!r} is not a text task; valid: {', '.join(TASKS)}")
    if tokenizer is None:
        raise CtkError(f"--data {path} is text, and the model brings no tokenizer (an hf: folder carries one)")
    if block_size < 2:
        raise CtkError(f"--seq-len must be at least 2 tokens, got {block_size}")
    if not 0 < val_fraction < 1:
        raise CtkError(f"the validation fraction must be in (0, 1), got {val_fraction}")
    train_files, val_files = _split_files(path)
    train_rows = _read_rows(train_files, text_column, label_column if task == "classify" else None)
    val_rows = _read_rows(val_files, text_column, label_column if task == "classify" else None) if val_files else None
    if task == "causal-lm":
        train, val = _blocks(train_rows, val_rows, tokenizer, block_size, val_fraction, path)
        return DataSplits(name=path.stem, train=train, val=val)
    if val_rows is None:
        cut = len(train_rows["text"]) - max(1, round(len(train_rows["text"]) * val_fraction))
        if cut < 1:
            raise CtkError(f"--data {path} has {len(train_rows['text'])} row(s); a split needs at least 2")
        val_rows = {name: column[cut:] for name, column in train_rows.items()}
        train_rows = {name: column[:cut] for name, column in train_rows.items()}
    classes = _classes(train_rows, val_rows, label_column, path) if task == "classify" else None
    train = _encoded(train_rows, tokenizer, block_size, classes)
    val = _encoded(val_rows, tokenizer, block_size, classes)
    return DataSplits(name=path.stem, train=train, val=val, classes=classes)


def _split_files(path: Path) -> tuple[list[Path], list[Path]]:
    if path.is_file():
        if path.suffix.lower() not in READERS:
            raise CtkError(f"--data {path}: text files end in {', '.join(READERS)}")
        return [path], []
    if not path.is_dir():
        raise CtkError(f"--data {path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in READERS)
    if not files:
        raise CtkError(f"--data {path}: no text files ({', '.join(READERS)}) in the folder")
    suffixes = {p.suffix.lower() for p in files}
    if len({READERS[s] for s in suffixes}) > 1:
        raise CtkError(f"--data {path} mixes file kinds ({', '.join(sorted(suffixes))}); use one kind")
    train = [p for p in files if p.stem == "train"]
    val = [p for p in files if p.stem in ("val", "validation")]
    return (train, val) if train and val else (files, [])


def _read_rows(files: Sequence[Path], text_column: str, label_column: str | None) -> dict[str, list]:
    """The text (and label) columns of ``files``, read one file at a time: an error names the file
    and row at fault, and no file's column types are cast to another's (``datasets`` reading files
    together turns dict labels into JSON text after a file of string labels)."""
    rows: dict[str, list] = {"text": [], **({"label": []} if label_column else {})}
    for file in files:
        table = _read_table(file)
        for column in [text_column] + ([label_column] if label_column else []):
            if column not in table.column_names:
                raise CtkError(f"--data {file} has no column {column!r} (columns: {', '.join(table.column_names)})")
        rows["text"] += [t if isinstance(t, str) else "" for t in table[text_column]]
        if label_column:
            rows["label"] += _labels(list(table[label_column]), file, label_column)
    if not any(text.strip() for text in rows["text"]):
        raise CtkError(f"--data {_named(files)} holds no text")
    return rows


def _read_table(file: Path) -> Any:
    """One file as a ``datasets.Dataset``, parsed by the reader its suffix names."""
    import datasets

    reader = READERS[file.suffix.lower()]
    with tempfile.TemporaryDirectory(prefix="ctk-datasets-") as cache:
        try:
            return datasets.load_dataset(reader, data_files={"train": [str(file)]}, cache_dir=cache,
                                         keep_in_memory=True)["train"]
        except Exception as error:  # the reader's parse errors, named with the file
            raise CtkError(f"--data {file} cannot be read as {reader}: {summary(error)}") from error


def _labels(labels: list, file: Path, column: str) -> list:
    """``labels`` after checking each is a class name or number: an object or a list (a JSON row's
    ``{"a": 1}``) would become a class named after its text. Rows count from 1 (after a header)."""
    for row, label in enumerate(labels, start=1):
        if label is None:
            raise CtkError(f"--data {file}: row {row}, column {column!r} has no label")
        if not isinstance(label, (str, int, float)):
            raise CtkError(f"--data {file}: row {row}, column {column!r} holds {type(label).__name__} "
                           f"{shown(label)}; a label is a class name or a number")
    return labels


def _blocks(train_rows: dict[str, list], val_rows: dict[str, list] | None, tokenizer: Any, block_size: int,
            val_fraction: float, path: Path) -> tuple[TensorRows, TensorRows]:
    train_ids = _packed(train_rows["text"], tokenizer, block_size)
    if val_rows is not None:
        val_ids = _packed(val_rows["text"], tokenizer, block_size)
    else:
        held = max(1, round(len(train_ids) * val_fraction))
        train_ids, val_ids = train_ids[:-held], train_ids[-held:]
    if len(train_ids) == 0 or len(val_ids) == 0:
        raise CtkError(f"--data {path} makes too few blocks of {block_size} tokens for a training and a "
                       "validation part; add text or lower --seq-len")
    return (TensorRows({"input_ids": train_ids, "labels": train_ids}),
            TensorRows({"input_ids": val_ids, "labels": val_ids}))


def _packed(texts: list[str], tokenizer: Any, block_size: int) -> torch.Tensor:
    """All ``texts`` as one token stream (end-of-text between rows), cut into ``[blocks, block_size]``."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for ids in tokenizer([t for t in texts if t.strip()], add_special_tokens=False)["input_ids"]:
        stream += ids + separator
    blocks = len(stream) // block_size
    return torch.tensor(stream[: blocks * block_size], dtype=torch.long).view(blocks, block_size)


def _classes(train_rows: dict[str, list], val_rows: dict[str, list], column: str, path: Path) -> list[str]:
    names = sorted({str(label) for label in train_rows["label"]}, key=_label_order)
    if len(names) < 2:
        raise CtkError(f"--data {path}: column {column!r} has one label ({names[0]}); classification needs two")
    unknown = sorted({str(label) for label in val_rows["label"]} - set(names))
    if unknown:
        raise CtkError(f"--data {path}: validation labels {unknown[:5]} never occur in the training part")
    return names


def _label_order(name: str) -> tuple[int, int | str]:
    """Integer labels in numeric order (so label 10 follows 9), names alphabetically."""
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)


def _encoded(rows: dict[str, list], tokenizer: Any, block_size: int, classes: list[str] | None) -> TensorRows:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(rows["text"], padding="max_length", truncation=True, max_length=block_size,
                        return_tensors="pt")
    columns = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if classes is not None:
        index = {name: i for i, name in enumerate(classes)}
        columns["labels"] = torch.tensor([index[str(label)] for label in rows["label"]], dtype=torch.long)
    return TensorRows(columns)


def _named(files: Sequence[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
