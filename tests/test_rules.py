"""Channel rules for convolutions, norms, embeddings and layout ops (``rules/layers.py``,
``rules/norms.py``, ``rules/layout.py``, ``rules/slicing.py``, ``rules/shape.py``).

Each rule gets a tiny module with hand-zeroed channels: the expected channels go (parameter shapes
after strip), the outputs do not change (checked at a second batch size), and an unsafe case is
kept, with the op named in the report where a pin keeps it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.capture import capture
from compile_toolkit.channels import analyze
from compile_toolkit.channels.rules import merge_tables
from compile_toolkit.channels.rules.base import Barrier, argument
from compile_toolkit.passes.strip import StripPass
from compile_toolkit.passes.verify import relative_error


def zero_(*tensors_and_indices) -> None:
    """``zero_(conv.weight, [1, 5], conv.bias, [1, 5])``: zero those rows."""
    with torch.no_grad():
        for tensor, index in zip(tensors_and_indices[::2], tensors_and_indices[1::2], strict=True):
            tensor[index] = 0


def zero_out(module: nn.Module, index) -> None:
    """Zero output channels ``index`` of a conv/linear/norm (weight rows and bias)."""
    zero_(module.weight, index)
    if module.bias is not None:
        zero_(module.bias, index)


def strip_exact(model: nn.Module, x: torch.Tensor, batch: int = 3):
    """Strip ``model`` (eval), check it on a random input of another batch size, return the
    stripped module, its parameters by name and its summary."""
    model.eval()
    stripped = ctk.strip(model, (x,))
    y = torch.randn(batch, *x.shape[1:])
    with torch.no_grad():
        assert relative_error([[model(y)]], [[stripped(y)]]) < 1e-5
    return stripped, {k: tuple(v.shape) for k, v in stripped.state_dict().items()}, ctk.strip_summary(stripped)


def barriers(model: nn.Module, x: torch.Tensor) -> list[str]:
    return analyze(capture(model.eval(), (x,)).program.module()).barriers


def user_of(gm: torch.fx.GraphModule, parameter: str) -> torch.fx.Node:
    """The op node that reads ``parameter``."""
    attr = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == parameter)
    return next(iter(attr.users))


def mentions(reasons: list[str], *words: str) -> bool:
    return any(all(w in r for w in words) for r in reasons)


# -- convolutions -------------------------------------------------------------------------------


class GroupedNet(nn.Module):
    """dense -> grouped (or depthwise) -> dense, convolutions of any ``dims``."""

    def __init__(self, c_in=8, c_out=12, groups=2, dims=2, transposed=False) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        mid = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims] if transposed else conv
        self.a = conv(3, c_in, 1)
        self.g = mid(c_in, c_out, 3, groups=groups, padding=1)
        self.b = conv(c_out, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.g(F.relu(self.a(x)))))


@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_conv_removes_a_position_from_every_group(transposed):
    model = GroupedNet(c_in=8, c_out=12, groups=2, transposed=transposed)
    zero_out(model.a, [1, 5])  # input position 1 of both groups
    if transposed:  # weight [in, out/groups]: output position 2 of both groups is column 2
        zero_(model.g.weight[:, 2], slice(None), model.g.bias, [2, 8])
    else:
        zero_out(model.g, [2, 8])
    stripped, shapes, _ = strip_exact(model, torch.randn(2, 3, 6, 6))
    assert shapes["a.weight"][0] == 6
    assert shapes["g.weight"][:2] == ((6, 5) if transposed else (10, 3))
    assert shapes["b.weight"][1] == 10
    assert argument(user_of(stripped, "g.weight"), "groups") == 2  # the group count stays


def test_grouped_conv_keeps_a_position_zero_in_one_group_only():
    model = GroupedNet(c_in=8, c_out=12, groups=2)
    zero_out(model.a, [1])  # group 0 only: removing it would make the groups unequal
    zero_out(model.g, [8])
    _, shapes, summary = strip_exact(model, torch.randn(2, 3, 6, 6))
    assert summary.channels_removed == 0 and shapes["g.weight"][:2] == (12, 4)
    control = GroupedNet(c_in=8, c_out=12, groups=2)  # positive control: the same position in both groups goes
    zero_out(control.a, [1, 5])
    zero_out(control.g, [2, 8])
    assert strip_exact(control, torch.randn(2, 3, 6, 6))[2].channels_removed > 0


@pytest.mark.parametrize("transposed", [False, True])
def test_depthwise_conv_with_channel_multiplier_removes_whole_groups(transposed):
    model = GroupedNet(c_in=6, c_out=12, groups=6, transposed=transposed)  # multiplier 2
    zero_out(model.a, [2])
    zero_(model.g.bias, [4, 5])  # the two outputs of input channel 2 have nothing else to add
    stripped, shapes, _ = strip_exact(model, torch.randn(2, 3, 6, 6))
    assert shapes["a.weight"][0] == 5
    assert shapes["g.weight"][:2] == ((5, 2) if transposed else (10, 1))
    assert shapes["b.weight"][1] == 10
    assert argument(user_of(stripped, "g.weight"), "groups") == 5  # the group count follows


def test_depthwise_multiplier_output_alone_is_kept():
    model = GroupedNet(c_in=6, c_out=12, groups=6)
    zero_out(model.g, [4])  # one of input channel 2's two outputs: its group must stay whole
    _, _, summary = strip_exact(model, torch.randn(2, 3, 6, 6))
    assert summary.channels_removed == 0
    control = GroupedNet(c_in=6, c_out=12, groups=6)  # positive control: the whole group of input channel 2
    zero_out(control.a, [2])
    zero_(control.g.bias, [4, 5])
    assert strip_exact(control, torch.randn(2, 3, 6, 6))[2].channels_removed > 0


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d(dims):
    model = GroupedNet(c_in=8, c_out=8, groups=4, dims=dims)
    zero_out(model.a, [0, 2, 4, 6])  # position 0 of all four groups
    zero_out(model.g, [1, 3, 5, 7])  # output position 1 of all four groups
    x = torch.randn(2, 3, *([5] * dims))
    _, shapes, _ = strip_exact(model, x)
    assert shapes["a.weight"][0] == 4 and shapes["g.weight"][:2] == (4, 1) and shapes["b.weight"][1] == 4


def test_decomposed_graph_convolution_and_native_batch_norm():
    """``run_decompositions`` gives ``aten.convolution`` (transposed too) and
    ``_native_batch_norm_legit_no_training`` with tuple outputs."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.ConvTranspose2d(8, 6, 3, groups=2), nn.Conv2d(6, 4, 1)
    ).eval()
    zero_out(model[1], [1, 5])
    x = torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,)).program.run_decompositions().module()
    targets = {str(n.target) for n in gm.graph.nodes}
    assert "aten.convolution.default" in targets and "aten._native_batch_norm_legit_no_training.default" in targets
    y = torch.randn(3, 3, 8, 8)
    reference = gm(y)
    result = StripPass()(gm)
    assert result.details.channels_removed == 1
    assert all(reason.startswith("model ") for reason in result.details.barriers)
    assert gm.get_parameter("3.weight").shape[:2] == (6, 3)
    assert relative_error([[reference]], [[gm(y)]]) < 1e-5


@settings(max_examples=10, deadline=None)
@given(
    positions=st.sets(st.integers(0, 3), max_size=4),
    one_group_only=st.sets(st.integers(0, 3), max_size=2),
    outputs=st.sets(st.integers(0, 2), max_size=3),
)
def test_grouped_conv_generated_zero_patterns(grouped_graph, positions, one_group_only, outputs):
    """Input positions zero in every group go, positions zero in one group stay; the same for
    output positions (capture once, zero the captured graph's weights)."""
    gm = copy.deepcopy(grouped_graph)  # GroupedNet(c_in=12, c_out=9, groups=3)
    rows = [g * 4 + j for j in positions for g in range(3)] + [j for j in one_group_only - positions]
    zero_(gm.a.weight, rows, gm.a.bias, rows)
    out_rows = [g * 3 + i for i in outputs for g in range(3)]
    zero_(gm.g.weight, out_rows, gm.g.bias, out_rows)
    y = torch.randn(3, 3, 5, 5)
    reference = gm(y)
    StripPass()(gm)
    kept_out = 3 - min(len(outputs), 2)  # a dim is never emptied
    kept_in = 1 if len(outputs) == 3 else 4 - min(len(positions), 3)  # no live output reads any input
    assert gm.a.weight.shape[0] == 3 * kept_in and gm.g.weight.shape[:2] == (3 * kept_out, kept_in)
    assert relative_error([[reference]], [[gm(y)]]) < 1e-5


@pytest.fixture(scope="module")
def grouped_graph():
    torch.manual_seed(1)
    return capture(GroupedNet(c_in=12, c_out=9, groups=3).eval(), (torch.randn(2, 3, 5, 5),)).program.module()


# -- norms --------------------------------------------------------------------------------------


class NormNet(nn.Module):
    def __init__(self, norm: nn.Module, c: int = 8) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.norm = norm
        self.b = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.norm(self.a(x))))


def randomize(norm: nn.Module) -> None:
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
        for name in ("running_mean", "running_var"):
            if getattr(norm, name, None) is not None:
                getattr(norm, name).uniform_(0.5, 1.5)


def test_group_norm_removes_whole_groups_and_rewrites_the_group_count():
    model = NormNet(nn.GroupNorm(4, 8))
    randomize(model.norm)
    zero_out(model.a, [2, 3])  # group 1: zero in, and the norm adds no shift
    zero_(model.norm.bias, [2, 3])
    stripped, shapes, _ = strip_exact(model, torch.randn(2, 3, 6, 6))
    assert shapes["a.weight"][0] == 6 and shapes["norm.weight"] == (6,) and shapes["b.weight"][1] == 6
    assert argument(user_of(stripped, "norm.weight"), "num_groups") == 3


def test_group_norm_keeps_part_of_a_group_and_pins_a_single_group():
    model = NormNet(nn.GroupNorm(4, 8))
    zero_out(model.a, [2])  # half a group: it enters its group's statistics
    zero_(model.norm.bias, [2], model.norm.weight, [2])
    _, _, summary = strip_exact(model, torch.randn(2, 3, 6, 6))
    assert summary.channels_removed == 0
    assert mentions(barriers(NormNet(nn.GroupNorm(1, 8)), torch.randn(2, 3, 6, 6)), "aten.group_norm", "one group")
    control = NormNet(nn.GroupNorm(4, 8))  # positive control: a whole group (channels 2 and 3) goes
    zero_out(control.a, [2, 3])
    zero_(control.norm.bias, [2, 3], control.norm.weight, [2, 3])
    _, shapes, summary = strip_exact(control, torch.randn(2, 3, 6, 6))
    assert summary.channels_removed > 0 and shapes["norm.weight"] == (6,)


@pytest.mark.parametrize("running", [False, True])
def test_instance_norm_channels_are_independent(running):
    model = NormNet(nn.InstanceNorm2d(8, affine=True, track_running_stats=running))
    randomize(model.norm)
    zero_out(model.a, [1, 6])
    zero_(model.norm.bias, [1, 6])
    if running:  # with running statistics a zero input comes out as -mean*scale: zero the scale
        zero_(model.norm.weight, [1, 6])
    _, shapes, _ = strip_exact(model, torch.randn(2, 3, 6, 6))
    assert shapes["a.weight"][0] == 6 and shapes["norm.bias"] == (6,) and shapes["b.weight"][1] == 6


def test_layer_norm_pins_normalised_features_with_a_reason():
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    zero_out(model[0], [3])
    zero_out(model[1], [3])
    x = torch.randn(2, 5)
    _, _, summary = strip_exact(model, x)
    assert summary.channels_removed == 0
    assert mentions(summary.barriers, "aten.layer_norm", "statistics")
    assert not mentions(summary.barriers, "no channel rule")
    control = nn.Sequential(nn.Linear(5, 8), nn.Identity(), nn.Linear(8, 3))  # positive control: without the norm
    zero_out(control[0], [3])
    assert strip_exact(control, x)[2].channels_removed == 1


def test_layer_norm_leading_dims_pass_through():
    """Channels-last LayerNorm (ConvNeXt): the conv before it is pinned, the MLP after it is not."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.norm = nn.LayerNorm(6)
            self.up = nn.Linear(6, 10)
            self.down = nn.Linear(10, 4)

        def forward(self, x):
            y = self.norm(self.conv(x).permute(0, 2, 3, 1))
            return self.down(F.gelu(self.up(y))).permute(0, 3, 1, 2)

    model = Block()
    zero_out(model.up, [4, 7])
    _, shapes, summary = strip_exact(model, torch.randn(2, 3, 4, 4))
    assert shapes["up.weight"] == (8, 6) and shapes["down.weight"] == (4, 8) and shapes["conv.weight"][0] == 6


# -- split, chunk, slice, select, unbind ----------------------------------------------------------


class SplitNet(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 1)
        self.side = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = self.a(x)
        if self.how == "chunk":
            p, q = y.chunk(2, dim=1)
        elif self.how == "split":
            p, q = y.split(4, dim=1)
        else:
            p, q = torch.split(y, [3, 5], dim=1)
        return self.b(torch.cat([F.relu(p), self.side(x) * q.sum(1, keepdim=True) + q.mean(1, keepdim=True), q], 1)[:, :12])


@pytest.mark.parametrize("how", ["chunk", "split", "split_with_sizes"])
def test_split_pieces_are_offset_ranges_and_sizes_are_rewritten(how):
    model = SplitNet(how)
    zero_out(model.a, [1])  # in the first piece, which only goes through relu into b
    _, shapes, _ = strip_exact(model, torch.randn(2, 3, 4, 4))
    assert shapes["a.weight"][0] == 7 and shapes["b.weight"][1] == 11


class SliceNet(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 10, 1)
        self.b = nn.Conv2d(4 if how != "strided" else 5, 4, 1)
        self.c = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        y = self.a(x)
        if self.how == "slice":
            part = y[:, 2:6]
        elif self.how == "back":
            part = y[:, -8:-4]
        elif self.how == "narrow":
            part = y.narrow(1, 2, 4)
        elif self.how == "tail":
            part = y[:, 6:]
        else:
            part = y[:, ::2]
        return self.b(part) + self.c(y).sum(1, keepdim=True)


@pytest.mark.parametrize("how", ["slice", "back", "narrow", "tail"])
def test_slice_loses_positions_inside_in_front_of_and_behind_the_range(how):
    model = SliceNet(how)
    zero_out(model.a, [0, 3, 8])  # one in front of the range, one inside and one behind ([2, 6)) or inside ([6, 10))
    for position in (0, 3, 8):
        zero_(model.c.weight[:, position], slice(None))
    stripped, shapes, _ = strip_exact(model, torch.randn(2, 3, 4, 4))
    assert shapes["b.weight"][1] == 3 and shapes["a.weight"][0] == 7


def test_strided_slice_is_pinned_and_named():
    model = SliceNet("strided")
    zero_out(model.a, [4])
    zero_(model.c.weight[:, 4], slice(None))
    _, _, summary = strip_exact(model, torch.randn(2, 3, 4, 4))
    assert summary.channels_removed == 0 and mentions(summary.barriers, "strided slice aten.slice")
    control = SliceNet("slice")  # positive control: the same position under a plain slice goes
    zero_out(control.a, [4])
    zero_(control.c.weight[:, 4], slice(None))
    assert strip_exact(control, torch.randn(2, 3, 4, 4))[2].channels_removed > 0


class SelectNet(nn.Module):
    def __init__(self, unbind: bool) -> None:
        super().__init__()
        self.unbind = unbind
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        y = self.a(x)
        first = y.unbind(1)[0] if self.unbind else y.select(1, 1)
        return self.b(y) * first.unsqueeze(1)


def test_select_keeps_only_the_selected_index():
    model = SelectNet(unbind=False)
    zero_out(model.a, [0, 4])  # both sides of the selected 1 go; the index moves to 0
    _, shapes, _ = strip_exact(model, torch.randn(2, 4))
    assert shapes["a.weight"][0] == 4


def test_unbind_pins_the_unbound_dim():
    model = SelectNet(unbind=True)
    zero_out(model.a, [4])
    _, _, summary = strip_exact(model, torch.randn(2, 4))
    assert summary.channels_removed == 0 and mentions(summary.barriers, "unbound by aten.unbind")
    control = SelectNet(unbind=False)  # positive control: the same position next to a select goes
    zero_out(control.a, [4])
    assert strip_exact(control, torch.randn(2, 4))[2].channels_removed > 0


# -- permute, expand, repeat, shuffle --------------------------------------------------------------


class LayoutNet(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 8)
        self.b = nn.Conv2d(16 if how == "repeat" else 8, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        if self.how == "permute":
            y = self.fc(y.permute(0, 2, 3, 1)).transpose(1, 3).transpose(2, 3)
        elif self.how == "expand":
            y = y + y.amax((2, 3), keepdim=True).expand(-1, 8, 4, 4)
        elif self.how == "expand_as":
            y = y * y.mean((2, 3), keepdim=True).expand_as(y)
        elif self.how == "repeat":
            y = y.repeat(1, 2, 1, 1)
        elif self.how == "movedim":
            y = self.fc(y.movedim(1, -1)).movedim(-1, 1)
        return self.b(y)


@pytest.mark.parametrize("how", ["permute", "expand", "expand_as", "repeat", "movedim"])
def test_layout_ops_carry_channels(how):
    model = LayoutNet(how)
    zero_out(model.a, [2, 5])
    if how in ("permute", "movedim"):
        zero_out(model.fc, [1])
    _, shapes, summary = strip_exact(model, torch.randn(2, 3, 4, 4))
    assert shapes["a.weight"][0] == 6
    assert shapes["b.weight"][1] == {"repeat": 12, "permute": 7, "movedim": 7}.get(how, 6)
    assert not mentions(summary.barriers, "no channel rule")


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle between two convolutions."""

    def __init__(self, groups: int = 2, c: int = 8) -> None:
        super().__init__()
        self.groups = groups
        self.a = nn.Conv2d(3, c, 1)
        self.b = nn.Conv2d(c, 4, 1, bias=False)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.b(y)


@pytest.mark.parametrize("groups", [2, 4])
def test_channel_shuffle_removes_a_position_of_every_group(groups):
    model = Shuffle(groups)
    per_group = 8 // groups
    zero_out(model.a, [g * per_group + 1 for g in range(groups)])
    stripped, shapes, _ = strip_exact(model, torch.randn(2, 3, 4, 4))
    assert shapes["a.weight"][0] == 8 - groups and shapes["b.weight"][1] == 8 - groups
    # channel 1 alone would break the groups: kept
    model = Shuffle(groups)
    zero_out(model.a, [1])
    assert strip_exact(model, torch.randn(2, 3, 4, 4))[2].channels_removed == 0


def test_channel_shuffle_maps_kept_channels_to_the_right_consumers():
    """Dead channels (the consumer ignores them) are found through the shuffle's permutation."""
    model = Shuffle(2)
    # shuffled channel k = 2 * j + g comes from a's channel g * 4 + j; b ignores k = 2, 3 (j = 1)
    zero_(model.b.weight[:, 2:4], slice(None))
    _, shapes, _ = strip_exact(model, torch.randn(2, 3, 4, 4))
    assert shapes["a.weight"][0] == 6 and shapes["b.weight"][1] == 6


class PixelNet(nn.Module):
    def __init__(self, unshuffle: bool) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        self.a = nn.Conv2d(3, 3 if unshuffle else 12, 1)
        self.b = nn.Conv2d(12 if unshuffle else 3, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(F.pixel_unshuffle(y, 2) if self.unshuffle else F.pixel_shuffle(y, 2))


def test_pixel_shuffle_and_unshuffle_move_blocks_of_channels():
    model = PixelNet(unshuffle=False)
    zero_out(model.a, [4, 5, 6, 7])  # output channel 1's block
    _, shapes, _ = strip_exact(model, torch.randn(2, 3, 4, 4))
    assert shapes["a.weight"][0] == 8 and shapes["b.weight"][1] == 2
    model = PixelNet(unshuffle=True)
    zero_out(model.a, [1])
    _, shapes, _ = strip_exact(model, torch.randn(2, 3, 4, 4))
    assert shapes["a.weight"][0] == 2 and shapes["b.weight"][1] == 8
    model = PixelNet(unshuffle=False)
    zero_out(model.a, [4])  # part of a block: kept
    assert strip_exact(model, torch.randn(2, 3, 4, 4))[2].channels_removed == 0


# -- roll, pad, embedding, dropout ------------------------------------------------------------------


class PadRollNet(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(10 if how == "pad_channels" else 8, 4, 3)

    def forward(self, x):
        y = self.a(x)
        y = {
            "roll": lambda: torch.roll(y, (1, -1), (2, 3)),
            "roll_channels": lambda: torch.roll(y, 1, 1),
            "pad": lambda: F.pad(y, (1, 1, 1, 1)),
            "reflect": lambda: F.pad(y, (1, 1, 1, 1), mode="reflect"),
            "pad_channels": lambda: F.pad(y, (0, 0, 0, 0, 1, 1)),
        }[self.how]()
        return self.b(y)


@pytest.mark.parametrize("how", ["roll", "pad", "reflect"])
def test_roll_and_pad_of_spatial_dims_pass_channels(how):
    model = PadRollNet(how)
    zero_out(model.a, [3])
    _, shapes, _ = strip_exact(model, torch.randn(2, 3, 5, 5))
    assert shapes["a.weight"][0] == 7 and shapes["b.weight"][1] == 7


@pytest.mark.parametrize(("how", "op"), [("roll_channels", "rolled by aten.roll"), ("pad_channels", "padded by aten.pad")])
def test_roll_and_pad_of_the_channel_dim_are_pinned(how, op):
    model = PadRollNet(how)
    zero_out(model.a, [3])
    _, _, summary = strip_exact(model, torch.randn(2, 3, 5, 5))
    assert summary.channels_removed == 0 and mentions(summary.barriers, op)
    control = PadRollNet("roll")  # positive control: the same channel under a spatial roll goes
    zero_out(control.a, [3])
    assert strip_exact(control, torch.randn(2, 3, 5, 5))[2].channels_removed > 0


class EmbedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.fc(self.emb(tokens)).sum(1)


def test_embedding_feature_columns_go_and_vocabulary_rows_stay():
    model = EmbedNet()
    zero_(model.emb.weight[:, 5], slice(None), model.emb.weight[7], slice(None))  # a feature and a token
    tokens = torch.randint(0, 10, (2, 6))
    model.eval()
    stripped = ctk.strip(model, (tokens,))
    other = torch.randint(0, 10, (3, 6))
    with torch.no_grad():
        assert relative_error([[model(other)]], [[stripped(other)]]) < 1e-5
    shapes = {k: tuple(v.shape) for k, v in stripped.state_dict().items()}
    assert shapes["emb.weight"] == (10, 7) and shapes["fc.weight"] == (3, 7)


@pytest.mark.parametrize(
    "dropout", [nn.Dropout(), nn.Dropout(inplace=True), nn.Dropout2d(), nn.AlphaDropout(), nn.FeatureAlphaDropout()]
)
def test_dropout_variants_pass_channels(dropout):
    model = NormNet(dropout)
    zero_out(model.a, [3])
    _, shapes, summary = strip_exact(model, torch.randn(2, 3, 4, 4))
    assert shapes["a.weight"][0] == 7 and not mentions(summary.barriers, "no channel rule")


class Windows(nn.Module):
    """Swin's window partition and reverse: the symbolic batch absorbs the window grid."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x).permute(0, 2, 3, 1)
        n, h, w, c = y.shape
        windows = y.view(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n * (h // 2) * (w // 2), 4, c)
        y = self.fc(windows).view(n, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)
        return self.b(y.permute(0, 3, 1, 2))


def test_window_partition_into_the_batch_keeps_channels_free():
    model = Windows()
    zero_out(model.a, [3])
    zero_out(model.fc, [5])
    _, shapes, summary = strip_exact(model, torch.randn(2, 3, 4, 4))
    assert shapes["a.weight"][0] == 7 and shapes["fc.weight"] == (7, 7) and shapes["b.weight"][1] == 7
    assert all(reason.startswith("model ") for reason in summary.barriers)


class FusedQKV(nn.Module):
    """A fused projection unpacked into q, k, v by index (Swin, timm ViTs), mixed elementwise."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 5)

    def forward(self, x):
        n, length, c = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj((q * k + v).transpose(1, 2).reshape(n, length, c))


def test_fused_qkv_unpacked_by_index_removes_a_head_from_q_k_and_v():
    model = FusedQKV()
    head_1 = [block * 8 + 4 + i for block in range(3) for i in range(4)]
    zero_out(model.qkv, head_1)
    _, shapes, _ = strip_exact(model, torch.randn(2, 6, 8))
    assert shapes["qkv.weight"] == (12, 8) and shapes["proj.weight"] == (5, 4)
    for part in (head_1[:4], head_1[6:7]):  # the head's query alone, one feature of its key
        model = FusedQKV()
        zero_out(model.qkv, part)
        assert strip_exact(model, torch.randn(2, 6, 8))[2].channels_removed == 0


class BiasTable(nn.Module):
    """A per-channel table read through an index buffer (Swin's relative position bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.table = nn.Parameter(torch.randn(5, 4))
        self.register_buffer("index", torch.randint(0, 5, (3, 3)))
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(self.a(x) + self.table[self.index].permute(2, 0, 1))


def test_index_passes_the_dims_it_does_not_index():
    model = BiasTable()
    zero_out(model.a, [2])
    zero_(model.table[:, 2], slice(None))
    _, shapes, summary = strip_exact(model, torch.randn(2, 3, 3, 3))
    assert shapes["table"] == (5, 3) and shapes["a.weight"][0] == 3 and shapes["b.weight"][1] == 3
    assert all(reason.startswith("model ") for reason in summary.barriers)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)


class ShuffleUnits(nn.Module):
    """Two ShuffleNetV2 units: chunk, branch, cat, shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.branch1 = nn.Conv2d(4, 4, 1)
        self.branch2 = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = F.relu(self.stem(x))
        for branch in (self.branch1, self.branch2):
            kept, through = y.chunk(2, dim=1)
            y = channel_shuffle(torch.cat([kept, F.relu(branch(through))], 1), 2)
        return self.head(y)


@pytest.fixture(scope="module")
def shuffle_graph():
    torch.manual_seed(2)
    return capture(ShuffleUnits().eval(), (torch.randn(2, 3, 4, 4),)).program.module()


@settings(max_examples=12, deadline=None)
@given(
    stem=st.sets(st.integers(0, 7), max_size=6),
    branch1=st.sets(st.integers(0, 3), max_size=3),
    branch2=st.sets(st.integers(0, 3), max_size=3),
    head=st.sets(st.integers(0, 7), max_size=6),
)
def test_shuffle_units_strip_exactly_for_generated_zero_patterns(shuffle_graph, stem, branch1, branch2, head):
    """Chunks become unequal splits, shuffles keep their groups, and the result is exact."""
    gm = copy.deepcopy(shuffle_graph)
    for conv, rows in ((gm.stem, stem), (gm.branch1, branch1), (gm.branch2, branch2)):
        zero_(conv.weight, sorted(rows), conv.bias, sorted(rows))
    zero_(gm.head.weight[:, sorted(head)], slice(None))  # the head ignores these inputs
    y = torch.randn(3, 3, 4, 4)
    reference = gm(y)
    before = sum(p.numel() for p in gm.parameters())
    removed = StripPass()(gm).details.channels_removed
    assert relative_error([[reference]], [[gm(y)]]) < 1e-5
    assert (sum(p.numel() for p in gm.parameters()) < before) == (removed > 0)


class EinsumAttention(nn.Module):
    """MaxViT-style attention written with einsum over (batch, heads, tokens, head_dim)."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = torch.einsum("b h i d, b h j d -> b h i j", q, k).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", scores, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def test_einsum_attention_loses_a_head_through_both_products():
    torch.manual_seed(0)
    model = EinsumAttention()
    head_1 = [part * 16 + 4 + d for part in range(3) for d in range(4)]  # head 1 of q, k and v
    zero_out(model.qkv, head_1)
    _, shapes, summary = strip_exact(model, torch.randn(2, 5, 16))
    assert shapes["qkv.weight"] == (36, 16) and shapes["proj.weight"] == (16, 12)
    assert not any("einsum" in b for b in summary.barriers)


def test_einsum_contracted_label_goes_where_one_operand_is_zero():
    """``x W^T`` written as einsum: a zero input column of W removes that feature of x's producer."""

    class Bilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 8)
            self.w = nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            return torch.einsum("...i,oi->...o", self.fc(x), self.w)

    model = Bilinear()
    zero_(model.w, (slice(None), [1, 5]))
    stripped, shapes, _ = strip_exact(model, torch.randn(2, 3, 6))
    assert shapes["fc.weight"] == (6, 6) and shapes["w"] == (4, 6)


@pytest.mark.parametrize(
    "equation, ranks, operands, output",
    [
        ("ij,jk", [2, 2], ["ij", "jk"], "ik"),
        ("b h i d, b h j d -> b h i j", [4, 4], ["bhid", "bhjd"], "bhij"),
        ("...i,oi->...o", [3, 2], ["abi", "oi"], "abo"),  # "..." becomes unused letters
        ("...ij,...jk->...ik", [4, 3], ["abij", "bjk"], "abik"),  # right-aligned
    ],
)
def test_einsum_equations_parse_to_labels(equation, ranks, operands, output):
    from compile_toolkit.channels.rules.einsum import parse

    eq = parse(equation, ranks)
    assert eq.operands == operands and eq.output == output


# -- in-place writes ----------------------------------------------------------------------------


class WriteIntoView(nn.Module):
    """conv a (6 channels) -> ``y[:, 1:3].add_(1)`` in place -> conv b reads ``y`` after the write."""

    def __init__(self, op: str = "add_") -> None:
        super().__init__()
        self.op = op
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.a(x)
        view = y[:, 1:3]
        view.add_(1.0) if self.op == "add_" else view.zero_()
        return self.b(y)


def test_an_in_place_write_that_others_read_is_a_barrier():
    """Channel 2 of ``a`` is zero, but the add writes 1 into it and ``b`` reads it: it stays (read as
    values, the graph would say channel 2 is zero and the strip would change the outputs). Channel
    4, outside the written view, goes."""
    model = WriteIntoView()
    zero_out(model.a, [2, 4])
    _, shapes, summary = strip_exact(model, torch.randn(2, 3, 4, 4))
    assert shapes["a.weight"][0] == 5 and summary.channels_removed == 1
    assert mentions(summary.barriers, "in-place aten.add_ at node add_", "aten.conv2d at node conv2d_1 reads")


def test_writing_zeros_in_place_strips_through():
    """``zero_`` only makes "zero" facts truer: channels 2 (zeroed by the write) and 4 (by hand) go."""
    model = WriteIntoView(op="zero_")
    zero_out(model.a, [4])
    stripped, shapes, summary = strip_exact(model, torch.randn(2, 3, 4, 4))
    assert summary.barriers == ["model input x", "model output"]
    assert shapes["a.weight"][0] == 5 and shapes["b.weight"][1] == 5  # channel 4; channel 2 is written, kept
    (channels,) = [n for n in stripped.graph.nodes if n.target == torch.ops.aten.slice.Tensor and n.args[1] == 1]
    assert channels.args[2:4] == (1, 3)


class ZeroedKeyBias(nn.Module):
    """Swin V2's attention input: ``bias = qkv.bias.clone(); bias[n:2n].zero_(); linear(x, w, bias)``,
    then 2 heads of 4 features each for q, k and v, and an output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        bias = self.qkv.bias.clone()
        bias[8:16].zero_()
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(x.shape[0], 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(x.shape[0], 5, 8))


def test_zeroed_key_bias_lets_heads_go_and_moves_the_slice():
    model = ZeroedKeyBias()
    with torch.no_grad():  # head 1 of q, k and v zeroed, as structure="head" would
        for third in range(3):
            model.qkv.weight[8 * third + 4 : 8 * third + 8] = 0
            model.qkv.bias[8 * third + 4 : 8 * third + 8] = 0
    stripped, shapes, summary = strip_exact(model, torch.randn(2, 5, 8))
    assert not [b for b in summary.barriers if "in-place" in b or "zero_" in b]
    assert shapes["qkv.weight"] == (12, 8) and shapes["proj.weight"] == (8, 4)
    slices = [n for n in stripped.graph.nodes if n.target == torch.ops.aten.slice.Tensor]
    assert [n.args[2:4] for n in slices] == [(4, 8)]  # the key third of the 12 kept bias values


class ReadsAroundWrites(nn.Module):
    """In-place ops the analysis may read as values, and one it may not (``case``)."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case

    def forward(self, x):
        y = x * 2
        if self.case == "chain":  # relu_ then add_ on the result: every reader goes through the last result
            return F.relu_(y).add_(1) * 3
        if self.case == "read_before":  # the view is read before the write: it sees the old values
            view = y[:, :2]
            before = view * 3
            y.add_(1)
            return before + y[:, 2:]
        view = y.transpose(0, 1)  # "view_after": a view made before the write, read after it
        y.mul_(2)
        return view + 1


@pytest.mark.parametrize("case, shared", [("chain", False), ("read_before", False), ("view_after", True)])
def test_shared_writes_follow_aliases_and_order(case, shared):
    from compile_toolkit.channels.mutation import shared_writes

    gm = capture(ReadsAroundWrites(case).eval(), (torch.randn(3, 4),)).program.module()
    found = {writer.name: reader.name for writer, reader in shared_writes(gm.graph).items()}
    assert bool(found) == shared, found
    if shared:
        assert found == {"mul_": "add"}


# -- norms along other dims, clamps -------------------------------------------------------------


class NormalizeThenClamp(nn.Module):
    """conv a (6) -> ``F.normalize`` over the width (Swin V2's cosine attention normalises each
    head's features the same way) -> clamp -> conv b."""

    def __init__(self, low: float) -> None:
        super().__init__()
        self.low = low
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.b(torch.clamp(F.normalize(self.a(x), dim=-1), min=self.low, max=6.0))


@pytest.mark.parametrize("low, kept", [(0.0, 4), (0.5, 6)])
def test_vector_norm_passes_channels_and_clamp_keeps_zero_only_if_in_range(low, kept):
    """A zero channel normalised stays zero (0 / max(0, eps)); clamped to [0, 6] it stays zero,
    to [0.5, 6] it becomes 0.5 and must stay."""
    model = NormalizeThenClamp(low)
    zero_out(model.a, [1, 4])
    _, shapes, summary = strip_exact(model, torch.randn(2, 3, 4, 5))
    assert shapes["a.weight"][0] == kept and shapes["b.weight"][1] == kept
    assert summary.barriers == ["model input x", "model output"]


class DivideByUnguarded(nn.Module):
    """conv a -> ``y / (|y|.sum(-1) + 1)``: a positive divisor, but not one the rules can prove so."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y / (y.abs().sum(-1, keepdim=True) + 1.0))


def test_divisor_of_a_zero_channel_is_kept_unless_provably_positive():
    """0 / d is 0 only where d != 0: the divisor's slice of a zero channel is dead only behind a
    clamp to a positive minimum (above); here the channel stays, and the result is still exact."""
    model = DivideByUnguarded()
    zero_out(model.a, [1])
    _, shapes, _ = strip_exact(model, torch.randn(2, 3, 4, 5))
    assert shapes["a.weight"][0] == 6


# -- the rule table ----------------------------------------------------------------------------------
def test_rule_tables_merge_and_refuse_an_op_with_two_rules():
    """Positive control first: distinct ops merge; then the same op from a second module fails,
    naming both modules, where ``dict.update`` let the later one win silently."""
    aten = torch.ops.aten
    first, second = Barrier(), Barrier()
    merged = merge_tables([("one", {aten.cumsum: first}), ("two", {aten.cumprod: second})])
    assert merged == {aten.cumsum: first, aten.cumprod: second}
    with pytest.raises(ValueError, match="aten.cumsum has a rule in both one and two"):
        merge_tables([("one", {aten.cumsum: first}), ("two", {aten.cumsum: second})])
