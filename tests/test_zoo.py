"""Every torchvision classification model: prune 40% of its channels, strip, and nothing changes.

One model per architecture family runs in the default suite (the smallest variant at the smallest
input it takes; ViT, Swin and ConvNeXt with two blocks per stage, ``SHALLOW``), but for MaxViT
(``ONNX_FILE_SLOW``); every other classification model of torchvision, and those three at full
depth, run under ``-m slow``. Each must
strip every channel pruning zeroed, compute what the pruned model computes (to 1e-4 of the output's
largest magnitude, on inputs strip never saw), get smaller in parameters and FLOPs, export to ONNX
and match the pruned model in ONNX Runtime, with no op left without a channel rule. The
representative models' own ONNX files (``torch.onnx.export`` of the pruned model) also strip, with
``ctk.strip_onnx``, to within 1% of the PyTorch path's parameters.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import rel_error
from zoo_models import barrier_ops, build, export_onnx, input_side, weights_as_onnx_holds_them

import compile_toolkit as ctk
from compile_toolkit.metrics import count_flops, count_params

TOLERANCE = 1e-4

# One per family: its smallest variant, run at the smallest input it takes (zoo_models.input_side).
REPRESENTATIVE = ["resnet18", "shufflenet_v2_x0_5", "swin_t", "convnext_tiny", "efficientnet_b0", "densenet121",
                  "googlenet", "regnet_x_400mf", "mobilenet_v3_small", "vit_b_32"]
# Deep ones run with two blocks in each run of blocks (zoo_models.build's ``blocks``: ViT 12 -> 2,
# Swin's third stage 6 -> 2, ConvNeXt's stages 3/3/9/3 -> 2), which keeps every op, coupling and
# shifted window: 10 s instead of 45 s for ViT; at full depth they run under ``-m slow``.
SHALLOW, SHALLOW_BLOCKS = ("swin_t", "convnext_tiny", "vit_b_32"), 2


def cases(names: list[str], slow: bool) -> list:
    marks = [pytest.mark.slow] if slow else []
    return [pytest.param(name, marks=marks, id=name) for name in names]


ALL = torchvision.models.list_models(module=torchvision.models)
# Models whose own ONNX file strips a construct of its own, run with that check under ``-m slow``
# (72 s each; their rules have unit tests of their own): swin_v2_t, a second Swin: zero_ into a bias
# slice (a ScatterND in its file), cosine attention (F.normalize); maxvit_t: attention written with
# Einsum (test_rules, test_onnx_strip_ops); and the shallow representatives at full depth.
ONNX_FILE_SLOW = ["swin_v2_t", "maxvit_t", *SHALLOW]
OTHERS = [name for name in ALL if name not in REPRESENTATIVE and name not in ONNX_FILE_SLOW]


def prune_strip_export(name: str, tmp_path, onnx_file: bool = False, blocks: int | None = None) -> None:
    """Prune, strip, check and export ``name`` (``blocks``: as ``zoo_models.build``'s); with
    ``onnx_file`` also strip the pruned model's own ONNX file (the pruning and the PyTorch strip
    shared, not repeated: zoo models are the suite's most expensive captures)."""
    model = build(name, blocks)
    side = input_side(name)
    x = torch.randn(2, 3, side, side)
    report = ctk.prune(model, (x,), sparsity=0.4, structure="channel")
    assert report.pruned > 0
    stripped = ctk.strip(model, (x,))
    summary = ctk.strip_summary(stripped)
    assert barrier_ops(summary.barriers) == []
    assert summary.channels_removed >= report.pruned  # whatever pruning zeroed, strip removes

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            y = torch.randn(x.shape, generator=generator)
            assert rel_error(model(y), stripped(y)) <= TOLERANCE
    assert count_params(stripped) < count_params(model)
    assert count_flops(stripped, (x,)) < count_flops(model, (x,))

    # ONNX Runtime runs the stripped graph and must match the pruned eager model
    (artifact,) = ctk.export(stripped, (x,), str(tmp_path / "out"), formats=("onnx",), reference=model)
    with torch.no_grad():
        scale = model(x).abs().max().item()
    assert artifact.max_abs_error <= TOLERANCE * scale
    if onnx_file:
        onnx_file_strips_as_far_as_the_pytorch_model(model, x, stripped, tmp_path)


def onnx_file_strips_as_far_as_the_pytorch_model(model: torch.nn.Module, x: torch.Tensor,
                                                 stripped: torch.nn.Module, tmp_path) -> None:
    """``torch.onnx.export`` of the pruned model (zeros inside, batch norms unfused), then
    ``ctk.strip_onnx``: verified in ONNX Runtime, and within 1% of what ``ctk.strip`` keeps.

    Every convolutional family's file, and ViT's (its TorchScript-exported attention once made ONNX
    Runtime insert a Reshape for Gemm from a batch the strip had fixed in the file's shapes),
    Swin's (window attention loses heads: its padding is a Pad whose pads are computed from sizes,
    its head reshapes' targets are written as constants), MaxViT's (attention written with Einsum)
    and Swin V2's (its key bias zeroed in the forward is a ScatterND onto constant rows, its zeros
    shaped by an Expand from the slice's sizes)."""
    kept = weights_as_onnx_holds_them(stripped)
    export_onnx(model, x, tmp_path / "pruned.onnx")
    summary = ctk.strip_onnx(tmp_path / "pruned.onnx", tmp_path / "small.onnx", latency=False)
    assert summary.max_relative_error <= 1e-5 and summary.channels_removed > 0
    assert abs(summary.parameters_after / kept - 1) <= 0.01, (summary.parameters_after, kept)


@pytest.mark.parametrize("name", cases(list(REPRESENTATIVE), slow=False))
def test_representative_model_prunes_strips_and_exports_exactly_and_so_does_its_onnx_file(name, tmp_path):
    prune_strip_export(name, tmp_path, onnx_file=True, blocks=SHALLOW_BLOCKS if name in SHALLOW else None)


@pytest.mark.parametrize("name", cases(ONNX_FILE_SLOW, slow=True))
def test_a_slow_model_prunes_strips_and_exports_exactly_and_so_does_its_onnx_file(name, tmp_path):
    prune_strip_export(name, tmp_path, onnx_file=True)


@pytest.mark.parametrize("name", cases(OTHERS, slow=True))
def test_every_other_model_prunes_strips_and_exports_exactly(name, tmp_path):
    prune_strip_export(name, tmp_path)
