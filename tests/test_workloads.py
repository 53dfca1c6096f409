"""The user's own model, data and task through `ctk export --pruned`: tiny Hugging Face folders
written with `save_pretrained` (a word-level tokenizer trained here, nothing downloaded), text
files and data-set factories made by the tests, and every bad input as one line with nothing
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import assert_clean_failure, run_cli
from test_data import WORDS, tiny_tokenizer, write_image_folder

from compile_toolkit.errors import CtkError
from compile_toolkit.workload import load_workload

SEQ = 16
GOOD, BAD = WORDS[:12], WORDS[12:]  # a review is labelled by which half of the words it uses


def review_rows(count: int = 40) -> list[dict[str, str]]:
    """Rows whose label is a function of their words, so a classifier can learn it."""
    rows = []
    for i in range(count):
        words, label = (GOOD, "good") if i % 2 else (BAD, "bad")
        rows.append({"text": " ".join(words[j % len(words)] for j in range(i % 5, i % 5 + 6)), "label": label})
    return rows


def corpus_lines(count: int = 30) -> list[str]:
    return [" ".join(WORDS[i % len(WORDS):] + WORDS[: i % len(WORDS)]) for i in range(count)]


def save_tokenizer(folder: Path):
    tokenizer = tiny_tokenizer([" ".join(WORDS)])
    tokenizer.save_pretrained(folder)
    return tokenizer


def bert_classifier(folder: Path, tokenizer: bool = True) -> Path:
    """A 2-layer BertForSequenceClassification with 2 labels, saved (with its tokenizer) to ``folder``."""
    from transformers import BertConfig, BertForSequenceClassification

    vocab = len(tiny_tokenizer([" ".join(WORDS)]))
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    if tokenizer:
        save_tokenizer(folder)
    return folder


def llama_lm(folder: Path) -> Path:
    """A 2-layer LlamaForCausalLM (grouped-query attention), saved with its tokenizer to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = save_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def reviews_jsonl(path: Path, rows: list[dict[str, str]] | None = None) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows or review_rows()))
    return path


def corpus_txt(path: Path) -> Path:
    path.write_text("\n".join(corpus_lines()) + "\n")
    return path


def export_args(model: Path, data: Path | str, out: Path, *extra: str) -> list[str]:
    return ["export", "--pruned", "--model", f"hf:{model}", "--data", str(data), "--seq-len", str(SEQ),
            "--finetune-epochs", "1", "--batch-size", "8", "--formats", "onnx", "--out", str(out), *extra]


def exported_metric(args: list[str], capsys) -> dict:
    status, err = run_cli(args, capsys)
    assert status == 0, err
    report = json.loads((Path(args[args.index("--out") + 1]) / "report.json").read_text())
    assert report["stripped"]["params"] < report["dense"]["params"] and report["strip"]["channels_removed"] > 0
    return report["metric"]


def test_hf_classifier_on_jsonl_reports_top1_everywhere(tmp_path, capsys):
    model = bert_classifier(tmp_path / "bert")
    metric = exported_metric(export_args(model, reviews_jsonl(tmp_path / "reviews.jsonl"), tmp_path / "out"), capsys)
    assert metric["name"] == "top1" and metric["split"] == "validation"
    assert all(0.0 <= metric[k] <= 1.0 for k in ("dense", "pruned", "stripped", "onnx"))
    assert metric["onnx"] == metric["stripped"] == metric["pruned"]


def test_hf_causal_lm_on_txt_reports_perplexity_everywhere(tmp_path, capsys):
    model = llama_lm(tmp_path / "llama")
    metric = exported_metric(export_args(model, corpus_txt(tmp_path / "corpus.txt"), tmp_path / "out"), capsys)
    assert metric["name"] == "perplexity"
    assert all(1.0 < metric[k] < 1000 for k in ("dense", "pruned", "stripped", "onnx"))
    assert metric["onnx"] == metric["stripped"] == metric["pruned"]
