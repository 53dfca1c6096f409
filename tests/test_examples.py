"""The examples people copy run: the README's Python blocks for the library and for language
models, and the package docstring's, in a scratch folder (they write ``out/``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import compile_toolkit as ctk
from compile_toolkit.models import load_model

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
    train = loaded.dataset.x_train[:64]
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
