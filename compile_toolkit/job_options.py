"""The options several commands share, each declared once (:func:`compile_toolkit.options.option`):
which model to load, where the output goes, and whether it may replace a folder."""

from __future__ import annotations

from typing import Any

from .models.registry import DEFAULT_SPEC
from .options import option


def model_option() -> Any:
    return option("--model", "digits-resnet (default), torchvision:<name>, timm:<name>, hf:<folder> (a local Hugging "
                  "Face folder), smollm2-135m, a .gguf file or path/to/file.py:factory", DEFAULT_SPEC)


def weights_option() -> Any:
    return option("--weights", "the model's state dict: .safetensors, or .pt/.pth read with "
                  "torch.load(weights_only=True)")


def input_shape_option() -> Any:
    return option("--input-shape", "example input shape, e.g. 1,3,224,224")


def out_option(default: str) -> Any:
    return option("--out", f"output folder (default {default})")


def force_option() -> Any:
    return option("--force", "replace --out even if it holds files this toolkit did not write (they are deleted; "
                  "the error without --force names them); never /, the home folder, a mount point, the current "
                  "folder or a folder holding the job's inputs", False)
