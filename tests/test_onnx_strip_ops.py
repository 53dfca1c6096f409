"""``strip_onnx`` through group norms, pads and einsums, on small torch models exported here by
``torch.onnx`` (both exporters) and hand-written files, with channels zeroed by hand: each rule
removes what ``ctk.strip`` removes from the PyTorch model, verified in ONNX Runtime against the
input file (1e-5 of the output's magnitude), and each has a positive control where it must keep
the channels (a group only partly zero, a nonzero pad value, a padded channel dim, a head only
partly zero, a group norm of one group)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from test_onnx_strip import export, hand_model, initializer_shapes, node, weights
from torch import nn
from torch.nn import functional as F

import compile_toolkit as ctk
from compile_toolkit.onnx_strip import strip_onnx


def stripped(model: nn.Module, x: torch.Tensor, tmp_path, dynamo: bool):
    """(summary, stripped file, ``ctk.strip``'s channels removed) for the model's export."""
    source = export(model.eval(), x, tmp_path / "model.onnx", dynamo)
    summary = strip_onnx(source, tmp_path / "small.onnx", latency=False)
    assert summary.max_relative_error <= 1e-5
    reference = ctk.strip_summary(ctk.strip(copy.deepcopy(model), (x,))).channels_removed
    return summary, tmp_path / "small.onnx", reference


def group_targets(path) -> list[int]:
    """The group count of each ``Reshape`` to ``[N, G, -1]`` whose target is a constant (an
    initializer or a ``Constant`` node)."""
    graph = onnx.load(str(path)).graph
    constants = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in graph.initializer}
    constants |= {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t).tolist() for n in graph.node
                  if n.op_type == "Constant"}
    targets = [constants.get(n.input[1]) for n in graph.node if n.op_type == "Reshape"]
    return [t[1] for t in targets if t is not None and len(t) == 3 and t[2] == -1]


def float_weights(path) -> int:
    """Elements of the file's float initializers (its shape constants left out)."""
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT)


def node_attribute(path, op: str, name: str) -> list:
    """Attribute ``name`` of every ``op`` node of the file."""
    return [onnx.helper.get_attribute_value(a) for n in onnx.load(str(path)).graph.node if n.op_type == op
            for a in n.attribute if a.name == name]


# -- group norm ------------------------------------------------------------------------------------


class Grouped(nn.Module):
    """A conv, a GroupNorm of 4 groups of 2 channels (affine perturbed as after training), a conv.
    ``zero``: the first conv's channels that are zero, with the norm's shift there."""

    def __init__(self, zero: list[int], groups: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.norm, self.b = nn.Conv2d(3, 8, 1), nn.GroupNorm(groups, 8), nn.Conv2d(8, 2, 1)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)
            self.a.weight[zero], self.a.bias[zero], self.norm.bias[zero] = 0, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.norm(self.a(x))))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("zero, removed", [([2, 3], 2), ([2], 0)], ids=["whole-group", "half-group"])
def test_a_decomposed_group_norm_loses_whole_groups(tmp_path, dynamo, zero, removed):
    """Both exporters write GroupNorm as ``Reshape`` to ``[N, G, -1]``, ``InstanceNormalization``
    and ``Reshape`` back: a group whose channels are all zero goes (two channels, one group: the
    ``[N, 4, -1]`` target becomes ``[N, 3, -1]``); a group zero in one channel only is kept whole
    (positive control: removing that channel would change its partner's statistics). As
    ``ctk.strip`` on the PyTorch model."""
    summary, small, reference = stripped(Grouped(zero), torch.randn(2, 3, 5, 5), tmp_path, dynamo)
    shapes = initializer_shapes(small)
    assert shapes["a.weight"] == (8 - removed, 3, 1, 1) and shapes["b.weight"] == (2, 8 - removed, 1, 1)
    assert summary.channels_removed == (1 if removed else 0) == (1 if reference else 0)
    assert group_targets(small) == [4 - removed // 2]


class OneGroup(Grouped):
    """:class:`Grouped` with a single group: every channel shares the statistics."""

    def __init__(self) -> None:
        super().__init__([2, 3], groups=1)


def test_a_group_norm_of_one_group_keeps_every_channel(tmp_path):
    """Positive control: with one group the zero channels still enter the others' mean and variance."""
    summary, small, reference = stripped(OneGroup(), torch.randn(2, 3, 5, 5), tmp_path, False)
    assert summary.channels_removed == reference == 0
    assert initializer_shapes(small)["a.weight"][0] == 8


@pytest.mark.parametrize("opset", [18, 21])
@pytest.mark.parametrize("zero, removed", [([4, 5], 2), ([4], 0)], ids=["whole-group", "half-group"])
def test_group_normalization_loses_whole_groups_and_its_group_count(tmp_path, opset, zero, removed):
    """``GroupNormalization`` (opset 18: scale and bias per group; 21: per channel), 3 groups of 2:
    the zero group goes with its scale and bias and ``num_groups`` becomes 2; a group zero in one
    channel is kept (positive control). Verified in ONNX Runtime."""
    a, b = weights(6, 3, 1, 1), weights(2, 6, 1, 1)
    a[zero] = 0
    size = 3 if opset == 18 else 6
    scale, bias = np.linspace(0.5, 1.5, size, dtype=np.float32), np.linspace(-0.5, 0.5, size, dtype=np.float32)
    bias[np.array(zero) // (2 if opset == 18 else 1)] = 0
    nodes = [node("Conv", ["x", "a"], "h"), node("GroupNormalization", ["h", "s", "t"], "n", num_groups=3),
             node("Relu", ["n"], "r"), node("Conv", ["r", "b"], "y")]
    model = hand_model(nodes, {"x": ["batch", 3, 4, 4]}, {"a": a, "b": b, "s": scale, "t": bias})
    model.opset_import[0].version = opset
    # onnx's shape inference leaves GroupNormalization's output unknown (a barrier): the file says it
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("n", onnx.TensorProto.FLOAT, ["batch", 6, 4, 4]))
    summary = strip_onnx(model, tmp_path / "small.onnx", latency=False)
    assert summary.max_relative_error <= 1e-5
    shapes = initializer_shapes(tmp_path / "small.onnx")
    assert shapes["a"][0] == 6 - removed and shapes["b"][1] == 6 - removed
    assert shapes["s"] == shapes["t"] == ((size - removed // 2,) if opset == 18 else (size - removed,))
    assert node_attribute(tmp_path / "small.onnx", "GroupNormalization", "num_groups") == [3 - removed // 2]


# -- pad -------------------------------------------------------------------------------------------


class Padded(nn.Module):
    """A conv whose channel 1 is zero, ``F.pad`` of its output, a conv. ``pad``: the pads (the
    spatial dims, or the channel dim too); ``mode`` and ``value`` as ``F.pad`` takes them."""

    def __init__(self, pad: tuple[int, ...], mode: str = "constant", value: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pad, self.mode, self.value = pad, mode, value
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4 + sum(pad[4:]), 2, 3)
        with torch.no_grad():
            self.a.weight[1], self.a.bias[1] = 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(F.pad(h, self.pad, self.mode, self.value if self.mode == "constant" else None))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("model, removed", [
    (Padded((1, 1, 2, 0)), 1),
    (Padded((1, 1, 1, 1), mode="reflect"), 1),
    (Padded((1, 1, 1, 1), value=1.0), 0),
    (Padded((0, 0, 0, 0, 1, 1)), 0),
], ids=["zeros", "reflect", "nonzero-value", "channel-dim"])
def test_a_channel_passes_a_pad_of_the_other_dims(tmp_path, dynamo, model, removed):
    """A zero channel stays zero through padding by zeros or by a reflection of itself, so it goes
    (as in ``ctk.strip``); padding a 1 into it makes its border nonzero, and padding the channel dim
    moves every channel after the pad, so both keep it (positive controls)."""
    summary, small, reference = stripped(model, torch.randn(2, 3, 6, 6), tmp_path, dynamo)
    assert summary.channels_removed == removed == reference
    shapes = initializer_shapes(small)
    assert shapes["a.weight"][0] == 4 - removed and shapes["b.weight"][1] == model.b.in_channels - removed


def test_pads_computed_from_sizes_are_followed(tmp_path):
    """Swin pads to a multiple of its window with pads computed from the input's sizes
    (``Shape`` -> ``Mod`` -> ``ConstantOfShape`` -> ``Concat`` under the TorchScript exporter):
    they are known, so the channels pass the pad (before, the node was a barrier)."""

    class ToWindows(Padded):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(F.pad(h, (0, (4 - h.shape[-1] % 4) % 4, 0, (4 - h.shape[-2] % 4) % 4)))

    summary, small, reference = stripped(ToWindows((0, 0, 0, 0)), torch.randn(2, 3, 6, 6), tmp_path, False)
    assert summary.channels_removed == reference == 1 and not [b for b in summary.barriers if "Pad" in b]
    assert initializer_shapes(small)["a.weight"][0] == 3


# -- einsum ----------------------------------------------------------------------------------------


class EinsumAttention(nn.Module):
    """Two heads of 4 written with ``einsum`` (MaxViT's way), value head ``v_zero`` zeroed in
    ``v_features`` of its 4 features, then a projection written as ``einsum`` with a weight."""

    def __init__(self, v_features: slice) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Parameter(torch.randn(3, 8))
        with torch.no_grad():
            self.v.weight[v_features], self.v.bias[v_features] = 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (f(x).reshape(b, s, 2, 4) for f in (self.q, self.k, self.v))
        p = torch.einsum("bshd,bthd->bhst", q, k).softmax(-1)
        return torch.einsum("bsi,oi->bso", torch.einsum("bhst,bthd->bshd", p, v).reshape(b, s, 8), self.out)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("v_features, removed", [(slice(4, 8), 4), (slice(4, 6), 0)], ids=["head", "half-head"])
def test_einsum_attention_loses_a_head_whose_values_are_zero(tmp_path, dynamo, v_features, removed):
    """A value head that is zero makes the head's output zero, so its queries and keys are dead
    and the head goes from q, k, v and the einsum projection (4 features of each), as in
    ``ctk.strip``; a head only half zero is kept (positive control: its head dim merges into the
    projection's features)."""
    summary, small, reference = stripped(EinsumAttention(v_features), torch.randn(2, 5, 8), tmp_path, dynamo)
    assert (summary.channels_removed > 0) == (reference > 0) == (removed > 0)
    shapes = initializer_shapes(small)  # the exporters name the transposed weights their own way
    assert shapes["q.bias"] == shapes["k.bias"] == shapes["v.bias"] == (8 - removed,)
    assert shapes["out"] == (3, 8 - removed)
    assert float_weights(tmp_path / "model.onnx") - float_weights(small) == 3 * (8 + 1) * removed + 3 * removed
