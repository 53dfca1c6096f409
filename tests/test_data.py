"""Data sources and tasks on real files made here: PNG image folders from the digits set, text
files read by `datasets`, tokenized by a real (tiny, locally trained) tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from compile_toolkit.data.images import Preprocessing, image_folder, model_preprocessing
from compile_toolkit.data.text import text_files
from compile_toolkit.errors import CtkError
from compile_toolkit.models import load_digits_dataset
from compile_toolkit.tasks import CausalLM, Classify, Embed, distillation_loss

SIZE = 16


def write_image_folder(root: Path, classes: tuple[int, ...] = (0, 1, 2), per_class: int = 4) -> Path:
    """Digits images as upscaled RGB PNG files in train/<class>/ and val/<class>/."""
    from PIL import Image

    data = load_digits_dataset()
    for split, images, labels in (("train", data.x_train, data.y_train), ("val", data.x_test, data.y_test)):
        for label in classes:
            folder = root / split / f"digit{label}"
            folder.mkdir(parents=True)
            picked = images[labels == label][:per_class]
            for i, image in enumerate(picked):
                grey = (image[0] * 255).to(torch.uint8).numpy()
                Image.fromarray(grey).convert("RGB").resize((SIZE, SIZE)).save(folder / f"{i}.png")
    return root


def test_image_folder_reads_classes_and_pixels(tmp_path):
    root = write_image_folder(tmp_path / "digits")
    splits = image_folder(root, Preprocessing((SIZE, SIZE), channels=1, mean=(0.5,), std=(0.5,)))
    assert splits.classes == ["digit0", "digit1", "digit2"] and splits.num_classes == 3
    assert len(splits.train) == 12 and len(splits.val) == 12
    x, y = splits.train[5]
    assert x.shape == (1, SIZE, SIZE) and y == 1
    assert -1.0 <= float(x.min()) < -0.9 and 0.9 < float(x.max()) <= 1.0  # black background, white strokes


def test_preprocessing_comes_from_the_model_or_the_options():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    pre = model_preprocessing(model)
    assert pre.size == (224, 224) and pre.resize == int(224 / 0.95) and pre.interpolation == "bicubic"
    pre = model_preprocessing(model, input_shape=(1, 1, 32, 32), mean=(0.5,), std=(0.25,))
    assert (pre.size, pre.channels, pre.mean, pre.std, pre.resize) == ((32, 32), 1, (0.5,), (0.25,), None)
    assert model_preprocessing(nn.Linear(2, 2), (1, 1, 8, 8)).mean == (pytest.approx(0.449),)


@pytest.mark.parametrize("breakage, needle", [
    ("empty", "needs train/<class>/ and val/<class>/"),
    ("no_classes", "has no class folders"),
    ("empty_class", "holds no images"),
    ("corrupt", "cannot be read"),
    ("val_differs", "only in train: ['digit2']"),
    ("one_class", "one class"),
])
def test_bad_image_folders_are_one_line_naming_the_path(tmp_path, breakage, needle):
    root = tmp_path / "data"
    if breakage == "empty":
        root.mkdir()
    elif breakage == "no_classes":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    elif breakage == "one_class":
        write_image_folder(root, classes=(0,))
    else:
        write_image_folder(root)
        if breakage == "empty_class":
            for f in (root / "train" / "digit1").iterdir():
                f.unlink()
        elif breakage == "corrupt":
            (root / "val" / "digit2" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        else:
            for f in (root / "val" / "digit2").iterdir():
                f.unlink()
            (root / "val" / "digit2").rmdir()
    with pytest.raises(CtkError, match=needle.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")) as error:
        image_folder(root, Preprocessing((SIZE, SIZE)))
    assert str(root) in str(error.value) and "\n" not in str(error.value)


WORDS = ("the strip pass removes dead channels and the pruned model keeps its accuracy while "
         "the graph gets smaller and faster in every runtime it is exported to").split()


def tiny_tokenizer(texts: list[str]):
    """A word-level tokenizer trained on ``texts`` with the `tokenizers` library (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def test_text_file_packs_blocks_for_causal_lm(tmp_path):
    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(20)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    tokenizer = tiny_tokenizer(lines)
    splits = text_files(path, tokenizer, "causal-lm", block_size=16, val_fraction=0.25)
    tokens = 20 * (len(WORDS) + 1)  # every word once per line, plus end-of-text
    blocks = tokens // 16
    assert len(splits.train) + len(splits.val) == blocks and len(splits.val) == round(blocks * 0.25)
    first = splits.train[0]
    assert first["input_ids"].shape == (16,) and torch.equal(first["input_ids"], first["labels"])
    stream = torch.cat([splits.train[i]["input_ids"] for i in range(len(splits.train))])
    assert tokenizer.decode(stream[: len(WORDS)]) == lines[0]
    assert int(stream[len(WORDS)]) == tokenizer.eos_token_id
    assert tokenizer.decode(stream[len(WORDS) + 1: 2 * len(WORDS) + 1]) == lines[1]


def test_jsonl_classification_with_named_labels_and_given_splits(tmp_path):
    folder = tmp_path / "reviews"
    folder.mkdir()
    rows = [{"text": " ".join(WORDS[: 3 + i]), "label": "good" if i % 2 else "bad"} for i in range(10)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:8]) + "\n")
    (folder / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows[8:]) + "\n")
    splits = text_files(folder, tiny_tokenizer([r["text"] for r in rows]), "classify", block_size=8)
    assert splits.classes == ["bad", "good"] and len(splits.train) == 8 and len(splits.val) == 2
    item = splits.val[1]
    assert item["labels"] == 1 and item["input_ids"].shape == (8,) and int(item["attention_mask"].sum()) == 8
    assert int(splits.train[0]["attention_mask"].sum()) == 3  # padded after its three words


@pytest.mark.parametrize("name, content, kwargs, needle", [
    ("empty.txt", "\n\n  \n", {"task": "causal-lm"}, "holds no text"),
    ("rows.csv", "sentence,label\nhello,1\n", {"task": "classify"}, "no column 'text' (columns: sentence, label)"),
    ("rows.csv", "text,label\nhello world,1\nthe strip,1\n", {"task": "classify"}, "one label"),
    ("short.txt", "the strip\n", {"task": "causal-lm", "block_size": 64}, "too few blocks"),
    ("notes.md", "# title\n", {"task": "causal-lm"}, "text files end in"),
    ("corpus.txt", "the strip pass\n", {"task": "causal-lm", "tokenizer": None}, "no tokenizer"),
])
def test_bad_text_data_is_one_line_naming_the_file_or_column(tmp_path, name, content, kwargs, needle):
    path = tmp_path / name
    path.write_text(content)
    kwargs = {"tokenizer": tiny_tokenizer(WORDS), **kwargs}
    with pytest.raises(CtkError) as error:
        text_files(path, **kwargs)
    assert needle in str(error.value) and str(path) in str(error.value)


def test_classify_metric_counts_top1_and_top5():
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0, 0], [0, 1, 5.0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 9.0]])
    labels = torch.tensor([0, 1, 3])
    model = nn.Identity()
    result = Classify(num_classes=7).evaluate(model, [(logits[:2], labels[:2]), (logits[2:], labels[2:])])
    assert result["top1"] == pytest.approx(1 / 3) and result["top5"] == pytest.approx(1.0)
    expected = nn.functional.cross_entropy(logits, labels).item()
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(CtkError, match=r"\[batch, 4\]"):
        Classify(num_classes=4).evaluate(model, [(logits, labels)])


class Bigram(nn.Module):
    """Logits that depend on the current token only: perplexity is computable by hand."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)


def test_perplexity_is_exp_of_the_mean_next_token_loss():
    model = Bigram(11)
    ids = torch.randint(0, 11, (3, 9))
    result = CausalLM().evaluate(model, [{"input_ids": ids, "labels": ids}])
    logits = model(ids)
    nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert result["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert CausalLM().loss(logits, {"labels": ids}).item() == pytest.approx(nll.item(), rel=1e-6)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


def test_embedding_cosine_to_the_dense_model_ignores_padding():
    dense, other = Encoder(), Encoder()
    ids = torch.randint(0, 20, (4, 5))
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[:, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    task = Embed()
    assert task.evaluate(dense, [batch], reference=dense)["cosine"] == pytest.approx(1.0)
    with torch.no_grad():
        other.embed.weight.copy_(dense.embed.weight)
        other.embed.weight[ids[:, 3:].flatten()] += 100.0  # only padded tokens change...
        other.embed.weight[ids[:, :3].flatten()] = dense.embed.weight[ids[:, :3].flatten()]
    assert task.evaluate(other, [batch], reference=dense)["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert task.evaluate(Encoder(), [batch], reference=dense)["cosine"] < 0.9  # ...a different model differs


def test_distillation_loss_is_zero_for_the_teacher_and_grows_with_the_gap():
    teacher = torch.randn(6, 10)
    assert distillation_loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-6)
    near, far = teacher + 0.1 * torch.randn(6, 10), torch.randn(6, 10)
    assert 0 < distillation_loss(near, teacher).item() < distillation_loss(far, teacher).item()
    tokens = torch.randn(2, 7, 10)  # a language model's [batch, tokens, vocab]: averaged per token
    per_token = distillation_loss(tokens.flatten(0, 1), torch.zeros(14, 10)).item()
    assert distillation_loss(tokens, torch.zeros(2, 7, 10)).item() == pytest.approx(per_token, rel=1e-6)


@pytest.mark.parametrize("model", ["timm:resnet18", pytest.param("torchvision:resnet18", marks=pytest.mark.slow)])
def test_export_pruned_on_an_image_folder_reports_top1_everywhere(tmp_path, model):
    """The user's own images: fine-tuned on train/, measured on val/ for the dense, pruned and
    stripped models and for the ONNX file in ONNX Runtime (which must equal the stripped model)."""
    from compile_toolkit.cli import main

    root = write_image_folder(tmp_path / "digits", per_class=8)
    out = tmp_path / "out"
    status = main(["export", "--pruned", "--model", model, "--data", str(root), "--input-shape", "4,3,32,32",
                   "--finetune-epochs", "1", "--batch-size", "8", "--formats", "onnx", "--out", str(out)])
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    metric = report["metric"]
    assert metric["name"] == "top1" and metric["split"] == "validation"
    assert all(0.0 <= metric[k] <= 1.0 for k in ("dense", "pruned", "stripped", "onnx"))
    assert metric["stripped"] == metric["pruned"] == metric["onnx"]  # strip and ONNX are exact
    assert report["pruning"]["distilled"] and len(report["pruning"]["finetune_losses"]) == 1
    assert report["pruning"]["importance"] == "mask_gradient"  # the user's data ranks the channels
    assert report["stripped"]["params"] < 0.5 * report["dense"]["params"]
    assert report["strip"]["channels_removed"] > 0


def test_export_with_a_bad_image_folder_writes_nothing(tmp_path, capsys):
    from compile_toolkit.cli import main

    root = write_image_folder(tmp_path / "digits")
    (root / "val" / "digit1" / "0.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    status = main(["export", "--model", "timm:resnet18", "--data", str(root), "--input-shape", "1,3,32,32",
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 1 and f"image file {root / 'val' / 'digit1' / '0.png'} cannot be read" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
