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


def bert_encoder(folder: Path) -> Path:
    """A 2-layer BertModel (no head: its config names no task, so the task is embed), with its tokenizer."""
    from transformers import BertConfig, BertModel

    tokenizer = save_tokenizer(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
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


DATA_FACTORY = '''
import torch
from torch.utils.data import TensorDataset

from compile_toolkit.models import load_digits_dataset


class Named(TensorDataset):
    classes = ["a", "b", "c"]


def digits():
    d = load_digits_dataset()
    return TensorDataset(d.x_train[:256], d.y_train[:256]), TensorDataset(d.x_test[:96], d.y_test[:96])


def three_classes():
    d = load_digits_dataset()
    return Named(d.x_train[:64], d.y_train[:64] % 3), Named(d.x_test[:16], d.y_test[:16] % 3)


def not_a_pair():
    return 42
'''


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "my_data.py"
    path.write_text(DATA_FACTORY)
    return path


def test_data_factory_through_export_reports_top1(tmp_path, data_file, capsys):
    out = tmp_path / "out"
    status, err = run_cli(["export", "--pruned", "--data", f"{data_file}:digits", "--finetune-epochs", "1",
                           "--formats", "onnx", "--out", str(out)], capsys)
    assert status == 0, err
    metric = json.loads((out / "report.json").read_text())["metric"]
    assert metric["name"] == "top1" and metric["dense"] > 0.9 and metric["onnx"] == metric["stripped"]


def test_load_workload_gives_the_training_loop_splits_task_and_metric(tmp_path, data_file):
    """What `ctk train` reads: `.splits.train`, `.splits.val`, `.task`, `.evaluate`."""
    loaded, work = load_workload("digits-resnet", f"{data_file}:digits", None, None, 32, task="classify")
    assert len(work.splits.train) == 256 and len(work.splits.val) == 96 and work.task.name == "classify"
    assert 0.9 < work.evaluate(loaded.module) <= 1.0 and loaded.example_inputs[0].shape == (8, 1, 8, 8)
    model = bert_classifier(tmp_path / "bert")
    loaded, work = load_workload(f"hf:{model}", str(reviews_jsonl(tmp_path / "r.jsonl")), None, None, 8, seq_len=SEQ)
    assert work.task.name == "classify" and work.splits.classes == ["bad", "good"] and loaded.task == "classify"
    assert [t.shape for t in loaded.example_inputs] == [(4, SEQ), (4, SEQ)]  # the whole validation split (4 rows)
    assert 0.0 <= work.evaluate(loaded.module) <= 1.0


def test_hf_task_comes_from_the_config_and_task_overrides_it(tmp_path):
    model = llama_lm(tmp_path / "llama")
    text = str(corpus_txt(tmp_path / "corpus.txt"))
    loaded, work = load_workload(f"hf:{model}", text, batch_size=8, seq_len=SEQ)
    assert work.task.name == "causal-lm" and loaded.example_inputs[0].shape[1] == SEQ
    loaded, work = load_workload(f"hf:{model}", text, batch_size=8, task="embed", seq_len=SEQ)
    assert work.task.name == "embed" and type(loaded.module).__name__ == "HiddenStates"
    assert work.evaluate(loaded.module, loaded.module) == pytest.approx(1.0)


@pytest.mark.slow
def test_hf_encoder_on_csv_reports_cosine_to_the_dense_model(tmp_path, capsys):
    """The embed task: no labels, the metric is the mean cosine of the embeddings to the dense
    model's (1 for the dense model itself), and recovery distils from it."""
    data = tmp_path / "sentences.csv"
    data.write_text("sentence\n" + "\n".join(corpus_lines(40)) + "\n")
    args = export_args(bert_encoder(tmp_path / "encoder"), data, tmp_path / "out", "--text-column", "sentence")
    metric = exported_metric(args, capsys)
    assert metric["name"] == "cosine" and metric["dense"] == 1.0
    assert 0.0 < metric["pruned"] < 1.0 and metric["onnx"] == metric["stripped"] == metric["pruned"]


def bad_input(tmp_path: Path, data_file: Path, kind: str) -> tuple[list[str], list[str]]:
    """CLI arguments of one bad input, and what its error line must name."""
    images = ["--model", "timm:resnet18", "--input-shape", "2,3,16,16"]
    if kind in ("empty image folder", "class-less image folder"):
        (tmp_path / "images" / "train").mkdir(parents=True)
        if kind == "class-less image folder":
            (tmp_path / "images" / "val").mkdir()
        return [*images, "--data", str(tmp_path / "images")], [str(tmp_path / "images")]
    if kind in ("corrupt image", "val classes differ"):
        root = write_image_folder(tmp_path / "images")
        if kind == "corrupt image":
            (root / "train" / "digit1" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
            return [*images, "--data", str(root)], [str(root / "train" / "digit1" / "2.png"), "cannot be read"]
        (root / "val" / "digit2").rename(root / "val" / "digit9")
        return [*images, "--data", str(root)], ["only in train: ['digit2']", "only in val: ['digit9']"]
    bert = ["--model", f"hf:{bert_classifier(tmp_path / 'bert', tokenizer=kind != 'no tokenizer')}"]
    if kind == "no text":
        (tmp_path / "empty.txt").write_text("\n  \n")
        return [*bert, "--data", str(tmp_path / "empty.txt"), "--task", "causal-lm"], [str(tmp_path / "empty.txt"), "no text"]
    if kind == "missing column":
        rows = [{"sentence": r["text"], "label": r["label"]} for r in review_rows()]
        path = reviews_jsonl(tmp_path / "r.jsonl", rows)
        return [*bert, "--data", str(path)], ["no column 'text'", "columns: sentence, label"]
    if kind == "missing label column":
        path = reviews_jsonl(tmp_path / "r.jsonl")
        return [*bert, "--data", str(path), "--label-column", "stars"], ["no column 'stars'", "columns: text, label"]
    if kind == "no tokenizer":
        return [*bert, "--data", str(reviews_jsonl(tmp_path / "r.jsonl"))], [str(tmp_path / "bert"), "no tokenizer"]
    if kind == "text for a model without tokenizer":
        return ["--data", str(reviews_jsonl(tmp_path / "r.jsonl"))], ["--model digits-resnet brings none", "hf:"]
    if kind == "task does not fit the output":
        return ["--data", f"{data_file}:digits", "--task", "causal-lm"], ["--task causal-lm", "[8, 10]", "digits-resnet"]
    if kind == "classes do not fit the output":
        return ["--data", f"{data_file}:three_classes"], ["--task classify", "[8, 10]", "[batch, 3]"]
    if kind == "task does not fit the data":
        return [*images, "--data", str(write_image_folder(tmp_path / "images")), "--task", "embed"], ["--task embed", "image folder"]
    if kind == "not a data pair":
        return ["--data", f"{data_file}:not_a_pair"], [f"{data_file}:not_a_pair", "returned int"]
    assert kind == "batch larger than the data"
    return [*bert, "--data", str(reviews_jsonl(tmp_path / "r.jsonl")), "--batch-size", "64"], ["--batch-size 64", "36 samples"]


BAD_INPUTS = ["empty image folder", "class-less image folder", "corrupt image", "val classes differ", "no text",
              "missing column", "missing label column", "no tokenizer", "text for a model without tokenizer",
              "task does not fit the output", "classes do not fit the output", "task does not fit the data",
              "not a data pair", "batch larger than the data"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_one_line_naming_it_and_nothing_is_written(tmp_path, data_file, capsys, kind):
    args, needles = bad_input(tmp_path, data_file, kind)
    out = tmp_path / "out"
    status, err = run_cli(["export", "--pruned", "--formats", "onnx", "--seq-len", str(SEQ), "--out", str(out), *args],
                          capsys)
    assert_clean_failure(status, err, *needles)
    assert status == 1 and not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_quantize_calibrates_on_the_text_data(tmp_path, capsys):
    """`--quantize int8` with `--data`: calibrated on the training split's token batches and
    judged on the validation split, where it used to want a built-in data set."""
    model = bert_classifier(tmp_path / "bert")
    args = export_args(model, reviews_jsonl(tmp_path / "reviews.jsonl"), tmp_path / "out", "--quantize", "int8")
    status, err = run_cli(args, capsys)
    assert status == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    models = report["quantization"]["models"]
    assert models["float_stripped"]["accuracy"] == report["metric"]["stripped"]
    assert 0.0 <= models["int8_stripped"]["accuracy"] <= 1.0 and report["quantization"]["onnx"]["quantized_nodes"]
    assert (tmp_path / "out" / "model.int8.onnx").is_file()
