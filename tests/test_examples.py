"""The examples people copy run: the README's Python blocks for the library and for language
models, and the package docstring's, in a scratch folder (they write ``out/``)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

import compile_toolkit as ctk
from compile_toolkit.models import load_digits_dataset, load_model

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def readme_block(first_import: str) -> str:
    """The README's Python block that imports ``first_import`` right after ``compile_toolkit``."""
    return next(block for block in python_blocks(README.read_text())
                if block.startswith("import compile_toolkit as ctk\n" + first_import))


def namespace() -> dict[str, object]:
    """What the examples take as given: a model, its example inputs and calibration batches."""
    loaded = load_model()
    train = load_digits_dataset().x_train[:64]
    return {"model": loaded.module, "example_inputs": loaded.example_inputs,
            "batches": [(batch,) for batch in train.split(32)]}


@pytest.mark.parametrize("source", ["readme", "package docstring"])
def test_example_runs_and_writes_its_artifacts(source, tmp_path, monkeypatch):
    code = readme_block("\n") if source == "readme" else python_blocks(ctk.__doc__)[0]
    monkeypatch.chdir(tmp_path)
    scope = namespace()
    exec(compile(code, f"<{source} example>", "exec"), scope)  # noqa: S102 - the example is the test
    assert ctk.strip_summary(scope["stripped"]).channels_removed > 0
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_language_model_example_runs_on_a_small_llama(tmp_path, monkeypatch):
    """The README's language-model block, with ``load_smollm2`` giving a 2-layer Llama (GQA) and
    a small tokenizer instead of SmolLM2 (whose path the slow tests run): it prunes, strips
    neurons exactly and writes a transformers folder that loads back."""
    from test_workloads import llama_lm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compile_toolkit.llm

    folder = llama_lm(tmp_path / "llama")
    monkeypatch.setattr(compile_toolkit.llm, "load_smollm2", lambda: (
        AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)))
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(readme_block("from compile_toolkit.llm"), "<readme LLM example>", "exec"), scope)  # noqa: S102
    assert scope["report"].zeroed > 0 and ctk.strip_summary(scope["stripped"]).channels_removed > 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf")
    assert reloaded.config.intermediate_size == 48  # 64 neurons, a quarter removed


DOCS = Path(__file__).resolve().parents[1] / "docs"


def docs_blocks(name: str, language: str = "python") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (DOCS / name).read_text(), re.S)


def digits_scope(code: str) -> dict[str, object]:
    """What the guides' fragments take as given on the built-in model: the model, its inputs and
    data, a training batch with its loss and optimizer, and (when the fragment names it) the
    stripped model."""
    import torch.nn.functional as F

    loaded = load_model()
    full = load_digits_dataset()  # a quarter of it where a fragment trains (the recipe's schedule needs the steps)
    data = full if "recipe" in code else dataclasses.replace(full, x_train=full.x_train[:320], y_train=full.y_train[:320],
                               x_test=full.x_test[:128], y_test=full.y_test[:128])
    model = loaded.module.train()
    scope = {"ctk": ctk, "model": model, "example_inputs": loaded.example_inputs, "dataset": data,
             "x": data.x_train[:32], "y": data.y_train[:32], "loss_fn": F.cross_entropy, "steps": 3,
             "optimizer": torch.optim.SGD(model.parameters(), lr=0.01), "images": data.x_train[:32],
             "batches": [(b,) for b in data.x_train[:32].split(8)], "x_val": data.x_test, "y_val": data.y_test}
    if "stripped" in code and "stripped =" not in code:
        scope["stripped"] = ctk.strip(load_model().module, loaded.example_inputs)
    return scope


@pytest.mark.parametrize("guide", ["pruning.md", "quantization.md"])
def test_every_guide_fragment_runs(guide, tmp_path, monkeypatch):
    """Each Python fragment of the guide runs as printed, in order (a fragment may use what an
    earlier one imported), on the built-in model (torchvision's ResNet-18 for the one naming its
    layers, a 2-layer BERT for attention heads), with recipe.yaml being the guide's own recipe."""
    from test_workloads import bert_encoder

    from compile_toolkit.pruning import importance

    monkeypatch.chdir(tmp_path)
    if guide == "pruning.md":
        (tmp_path / "recipe.yaml").write_text(docs_blocks(guide, "yaml")[0])
    blocks, carried, ran = docs_blocks(guide), {}, 0
    for number, code in enumerate(blocks):
        givens = digits_scope(code)
        if "layer4" in code:
            resnet = load_model("torchvision:resnet18", input_shape=(1, 3, 64, 64))
            givens.update(model=resnet.module, example_inputs=resnet.example_inputs)
        if "attention_head" in code:
            bert = load_model(f"hf:{bert_encoder(tmp_path / 'bert')}")
            vocab = bert.module.model.config.vocab_size
            ids, mask = torch.randint(0, vocab, (32, 8)), torch.ones(32, 8, dtype=torch.long)
            givens.update(model=bert.module, example_inputs=bert.example_inputs, ids=ids, mask=mask)
        scope = {**carried, **givens}
        try:
            exec(compile(code, f"<{guide} block {number}>", "exec"), scope)  # noqa: S102 - the fragment is the test
        finally:
            importance._REGISTRY.pop("my_score", None)  # the template registers a criterion
        carried.update({name: value for name, value in scope.items() if name not in givens})
        ran += 1
    assert ran == len(blocks) >= (9 if guide == "pruning.md" else 1)
    if guide == "quantization.md":
        assert (tmp_path / "out" / "model.int8.onnx").is_file()
