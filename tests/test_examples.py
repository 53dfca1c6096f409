"""The examples people copy run: the README's Python block for the library and the package
docstring's, on the built-in model, in a scratch folder (they write ``out/``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import compile_toolkit as ctk
from compile_toolkit.models import load_model

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def library_block() -> str:
    """The README's block for the library API (the LLM block needs the SmolLM2 weights)."""
    return next(block for block in python_blocks(README.read_text()) if block.startswith("import compile_toolkit"))


def namespace() -> dict[str, object]:
    """What the examples take as given: a model, its example inputs and calibration batches."""
    loaded = load_model()
    train = loaded.dataset.x_train[:64]
    return {"model": loaded.module, "example_inputs": loaded.example_inputs,
            "batches": [(batch,) for batch in train.split(32)]}


@pytest.mark.parametrize("source", ["readme", "package docstring"])
def test_example_runs_and_writes_its_artifacts(source, tmp_path, monkeypatch):
    code = library_block() if source == "readme" else python_blocks(ctk.__doc__)[0]
    monkeypatch.chdir(tmp_path)
    scope = namespace()
    exec(compile(code, f"<{source} example>", "exec"), scope)  # noqa: S102 - the example is the test
    assert ctk.strip_summary(scope["stripped"]).channels_removed > 0
    assert (tmp_path / "out" / "model.onnx").is_file()
