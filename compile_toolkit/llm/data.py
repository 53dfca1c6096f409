"""The built-in ``pydoc`` text: Python's own ``pydoc_data.topics`` (about 465k characters of
English technical prose, shipped with every Python), split into calibration, training and
held-out parts and packed into fixed-length token blocks for causal language modelling.

Whole topics go to one part, so no document's text is both calibrated or trained on and held
out. There are only about 80 topics, of very different lengths, so a hash of the name would give
parts far from their shares; instead topics are dealt in name order, each to the part furthest
below its share of characters (20% calibration, 65% training, 15% held out). The split is a
function of the topic set alone: the same on every machine with the same Python. Within a part
topics are joined with the tokenizer's end-of-text token between them, tokenized once, and cut
into blocks (the tail shorter than a block is dropped).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from pydoc_data.topics import topics

import torch
from transformers import PreTrainedTokenizerBase

from ..data.text import TensorRows
from ..errors import CtkError

SPLITS = ("calibration", "train", "heldout")
SHARES = {"calibration": 0.20, "train": 0.65, "heldout": 0.15}


def pydoc_topics(split: str) -> list[str]:
    """The topic texts of one part, in topic-name order."""
    if split not in SPLITS:
        raise CtkError(f"unknown pydoc split {split!r}; choose from {', '.join(SPLITS)}")
    return [topics[name] for name in sorted(topics) if _assignment()[name] == split]


def write_pydoc_folder(folder: Path, train: tuple[str, int], val: tuple[str, int]) -> Path:
    """``folder`` with ``train.jsonl`` and ``val.jsonl``: the first whole topics of a part (name,
    characters) until that many characters are reached, one JSON line each: a text data folder
    for ``--data``. (A .txt file would make each line a row, with an end-of-text token in place of
    every line break: SmolLM2's dense perplexity 76.6 instead of 27.0 on such text.)"""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (split, chars) in (("train", train), ("val", val)):
        chosen, size = [], 0
        for text in pydoc_topics(split):
            if size >= chars:
                break
            chosen.append(text)
            size += len(text)
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in chosen))
    return folder


@cache
def _assignment() -> dict[str, str]:
    """Topic name -> part, dealt greedily by character share."""
    sizes = dict.fromkeys(SPLITS, 0)
    assigned = {}
    for name in sorted(topics):
        total = sum(sizes.values()) + len(topics[name])
        part = max(SPLITS, key=lambda s: SHARES[s] * total - sizes[s])
        assigned[name] = part
        sizes[part] += len(topics[name])
    return assigned


@dataclass(frozen=True)
class TokenBlocks:
    """``blocks``: ``[count, length]`` token ids of one part, each row a training/eval sequence."""

    split: str
    blocks: torch.Tensor

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return list(self.blocks.split(batch_size))


def pydoc_blocks(
    tokenizer: PreTrainedTokenizerBase, split: str, block_size: int = 256, max_blocks: int | None = None
) -> TokenBlocks:
    """Token blocks of ``split`` (the first ``max_blocks`` when given), tokenized with ``tokenizer``."""
    if block_size < 2:
        raise CtkError(f"block_size must be at least 2 tokens, got {block_size}")
    separator = tokenizer.eos_token or "\n\n"
    ids = tokenizer(separator.join(pydoc_topics(split)), return_tensors="pt", verbose=False)["input_ids"][0]
    count = len(ids) // block_size
    if max_blocks is not None:
        if max_blocks > count:
            raise CtkError(f"the pydoc {split} split has {count} blocks of {block_size} tokens, "
                           f"{max_blocks} were asked for")
        count = max_blocks
    if count == 0:
        raise CtkError(f"the pydoc {split} split has {len(ids)} tokens, fewer than one block of {block_size}")
    return TokenBlocks(split, ids[: count * block_size].view(count, block_size).clone())


def pydoc_rows(tokenizer: PreTrainedTokenizerBase, block_size: int) -> dict[str, TensorRows]:
    """Each part as the rows the training loop and the tasks read (``input_ids`` and the same
    ids as ``labels``): what ``--data pydoc`` gives, ``heldout`` being the validation split."""
    rows = {}
    for split in SPLITS:
        ids = pydoc_blocks(tokenizer, split, block_size).blocks
        rows[split] = TensorRows({"input_ids": ids, "labels": ids})
    return rows
