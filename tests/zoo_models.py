"""torchvision classifiers as the zoo test (``test_zoo.py``) and the sweeps (``tools/zoo_sweep.py``,
``tools/sweep_onnx_strip.py``) build, feed and export them, so that a sweep row and a test case
are the same model."""

from __future__ import annotations

import re
import warnings

import torch
import torchvision
from torch import nn


def build(name: str, blocks: int | None = None) -> nn.Module:
    """The model with seeded random weights; tensors its init leaves all zero (ViT's head, biases,
    BN means) get small random values, so no output is zero whatever the input. With ``blocks``,
    every run of more than that many blocks of one kind (a ViT's encoder, a Swin or ConvNeXt
    stage) keeps its first ``blocks``: the same ops and couplings in a graph a fraction the size."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    if blocks is not None:
        for module in model.modules():
            if isinstance(module, nn.Sequential) and len(module) > blocks and len({type(m) for m in module}) == 1:
                del module[blocks:]
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point() and not t.any():
                t.normal_(0, 0.1)
    return model


def input_side(name: str) -> int:
    """The smallest square input the model takes: 224 where position embeddings or windows are
    made for it (ViT, Swin, MaxViT), 75 for Inception v3, 64 for every other convnet."""
    if name == "inception_v3":
        return 75
    return 224 if name.startswith(("vit_", "swin_", "maxvit_")) else 64


def export_onnx(model: nn.Module, x: torch.Tensor, path) -> None:
    """The ONNX file a user of ``torch.onnx`` gets: the TorchScript exporter, batch norms unfused
    (no constant folding), a dynamic batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})


def weights_as_onnx_holds_them(module: nn.Module) -> int:
    """Parameters plus batch-norm running statistics: an ONNX file with batch norms unfused holds both
    as initializers (densenet, a batch norm on every concatenation, differs by 1.6% without them)."""
    stats = sum(b.numel() for name, b in module.named_buffers() if name.endswith(("running_mean", "running_var")))
    return sum(p.numel() for p in module.parameters()) + stats


def barrier_ops(reasons: list[str]) -> list[str]:
    """The ops without a channel rule among the reasons that kept channels alive."""
    return sorted({m.group(1) for r in reasons if (m := re.match(r"no channel rule for (\S+) at node", r))})
