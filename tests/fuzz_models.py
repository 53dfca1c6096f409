"""Random architectures with known zero patterns, for fuzzing the strip pass.

A case is drawn in two steps. :func:`draw_spec` draws the *structure* (stages of convolutions,
residual branches with concatenations, splits, channel-last MLPs, a token stage with grouped-query
attention, a flattening head) from a :class:`Draw`, which is either hypothesis (the tests, which
shrink) or a seeded ``random.Random`` (``tools/fuzz_strip.py``, where a seed reproduces a case).
:func:`build` turns the spec into an ``nn.Module`` and, while it builds, records every
**channel group** it creates: the tensors that carry a set of channels (producers that write
them, consumers that read them), and which channels are tied to which (grouped convolutions
tie position ``j`` of every group). Then the spec's ``zero_seed`` zeroes channels of those groups
in ways the generator *knows* make them removable:

- ``zero``: along every producer chain into the group, one producer's slice is zeroed (a conv's
  rows and bias, a norm's scale and shift) and every later producer is made to keep zeros (its
  bias / shift and mean zero), so the channel is exactly zero wherever it flows;
- ``dead``: every consumer's input slice is zeroed, so nothing depends on the channel;
- unused split pieces (dead branches) are removable by construction;

and adds decoy zeros that do **not** make a channel removable (a bias alone, a norm scale alone,
a query head, scattered hand zeros), which only the numerical comparison judges.

The oracle (:func:`check_oracle`) is independent of the analysis: for every parameter slot of a
group, the generator's own count of removable channels bounds the stripped parameter's size.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # compile_toolkit itself is imported where a case runs
    from compile_toolkit.passes.strip import StripSummary

T = TypeVar("T")


# -- choices ---------------------------------------------------------------------------------
class Draw(Protocol):
    """A source of choices: hypothesis's ``draw`` (shrinkable) or a seeded ``random.Random``."""

    def int(self, lo: int, hi: int) -> int: ...

    def pick(self, options: Sequence[T]) -> T: ...


class RandomDraw:
    """Choices from ``random.Random(seed)``: the same seed always draws the same spec."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def pick(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]


class HypothesisDraw:
    """Choices from a hypothesis ``st.composite`` draw, so failing cases shrink."""

    def __init__(self, draw: Callable) -> None:
        from hypothesis import strategies as st

        self._draw, self._st = draw, st

    def int(self, lo: int, hi: int) -> int:
        return self._draw(self._st.integers(lo, hi))

    def pick(self, options: Sequence[T]) -> T:
        return options[self._draw(self._st.integers(0, len(options) - 1))]


# -- specs: one small dataclass per op family --------------------------------------------------
ZERO_KEEPING = ("relu", "gelu", "silu", "tanh", "hardswish", "leaky_relu", "elu", "abs", "neg", "half", "square")
NOT_ZERO_KEEPING = ("sigmoid", "softplus", "plus_one", "cos")
ACTIVATIONS = ZERO_KEEPING + NOT_ZERO_KEEPING


@dataclass(frozen=True)
class ConvSpec:
    """``kind``: dense, grouped, depthwise or transposed (stems only: it changes the spatial size)."""

    kind: str
    out: int
    kernel: int = 3
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    bias: bool = True


@dataclass(frozen=True)
class NormSpec:
    kind: str  # batch | group | layer
    groups: int = 1


@dataclass(frozen=True)
class ConvBranch:
    """``x + chain(x)``: convs (the first dense or grouped, any in the middle, the last back to the
    stream width), each optionally followed by a norm and an activation."""

    convs: tuple[ConvSpec, ...]
    norms: tuple[NormSpec | None, ...]
    acts: tuple[str, ...]


@dataclass(frozen=True)
class CatBranch:
    """``x + last(act(cat(p(x), q(x))))``."""

    a: int
    b: int
    act: str


@dataclass(frozen=True)
class SplitBranch:
    """``first(x)`` split into ``a`` and ``b`` channels (``how``: split, chunk, slice, narrow);
    ``merge``: ``add`` (``x + p(a) + q(b)``), ``cat`` (``x + last(cat(a, b))``) or ``drop``
    (``x + p(a)``; ``b`` is computed and never used: a dead branch)."""

    a: int
    b: int
    how: str
    merge: str
    act: str


@dataclass(frozen=True)
class MlpBranch:
    """``x + fc2(act(fc1(ln?(x))))``, channel-last (``permute``) when on a conv stream."""

    hidden: int
    act: str
    layer_norm: bool


@dataclass(frozen=True)
class AttentionBranch:
    """``x + o(sdpa(q(x), k(x), v(x)))`` with ``heads`` query heads sharing ``kv_heads`` key/value
    heads (grouped-query attention); ``fused``: one ``qkv`` linear and a split."""

    heads: int
    kv_heads: int
    head_dim: int
    fused: bool
    causal: bool
    layer_norm: bool


@dataclass(frozen=True)
class StreamOp:
    """An op on the stream between branches: an activation or a pooling."""

    kind: str  # an activation name, or maxpool / avgpool


Block = ConvBranch | CatBranch | SplitBranch | MlpBranch | AttentionBranch | StreamOp


@dataclass(frozen=True)
class StageSpec:
    stem: ConvSpec
    stem_norm: NormSpec | None
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A whole case: structure, and the seeds of its weights and of its zero pattern."""

    in_channels: int
    size: int
    stages: tuple[StageSpec, ...]
    tokens: tuple[Block, ...]  # after the conv stages: flatten to tokens; empty: no token stage
    head_pool: int  # adaptive pool size before a conv head (0: none)
    classes: int
    weight_seed: int
    zero_seed: int


def _width(draw: Draw) -> int:
    return draw.pick((2, 3, 4, 4, 6, 8))


def _divisor(draw: Draw, n: int, cin: int | None = None) -> int:
    """A group count above 1 dividing ``n``, leaving at least 2 input channels per group (one
    input channel per group is a depthwise conv, which ties its outputs to its inputs)."""
    return draw.pick([g for g in range(2, n + 1) if n % g == 0 and (cin is None or cin // g >= 2)] or [1])


def _conv(draw: Draw, cin: int, out: int, kinds: Sequence[str]) -> ConvSpec:
    kind = draw.pick(kinds)
    if kind == "grouped":
        groups = _divisor(draw, math.gcd(cin, out), cin)
        if groups > 1:
            return ConvSpec("grouped", out, draw.pick((1, 3)), groups=groups, bias=draw.int(0, 1) == 1)
        kind = "dense"
    if kind == "depthwise":
        return ConvSpec("depthwise", cin, 3, dilation=draw.pick((1, 2)), groups=cin, bias=draw.int(0, 1) == 1)
    return ConvSpec("dense", out, draw.pick((1, 3)), dilation=draw.pick((1, 1, 2)), bias=draw.int(0, 3) > 0)


def _norm(draw: Draw, width: int, kinds: Sequence[str] = ("batch", "batch", "group", "none", "none")
          ) -> NormSpec | None:
    kind = draw.pick(kinds)
    if kind == "none":
        return None
    return NormSpec(kind, _divisor(draw, width) if kind == "group" else 1)


def _stem(draw: Draw, cin: int, size: int) -> tuple[ConvSpec, int]:
    out = _width(draw)
    kind = draw.pick(("dense", "dense", "strided", "transposed", "grouped"))
    if kind == "strided" and size >= 4:
        return ConvSpec("dense", out, 3, stride=2), (size + 1) // 2
    if kind == "transposed" and size <= 4:
        g = draw.pick([d for d in (1, 2) if cin % d == 0 and out % d == 0 and cin // d >= 2] or [1])
        return ConvSpec("transposed", out, 2, stride=2, groups=g, bias=draw.int(0, 1) == 1), size * 2
    groups = _divisor(draw, math.gcd(cin, out), cin)
    if kind == "grouped" and groups > 1:
        return ConvSpec("grouped", out, 3, groups=groups), size
    return ConvSpec("dense", out, draw.pick((1, 3)), dilation=draw.pick((1, 2))), size


def _conv_branch(draw: Draw, width: int) -> ConvBranch:
    convs, norms, acts = [], [], []
    cin = width
    for i in range(draw.int(1, 2)):
        last = i > 0 and draw.int(0, 1) == 1
        out = width if last else _width(draw)
        conv = _conv(draw, cin, out, ("dense", "grouped") if i == 0 or last else ("dense", "grouped", "depthwise"))
        convs.append(conv)
        norms.append(_norm(draw, conv.out))
        acts.append(draw.pick(ACTIVATIONS))
        cin = conv.out
        if last:
            break
    if cin != width or len(convs) == 1 or convs[-1].kind == "depthwise":  # a depthwise conv would tie
        # the branch's hidden channels to the stream's, so a branch ends with a conv of its own
        convs.append(_conv(draw, cin, width, ("dense", "grouped")))
        norms.append(_norm(draw, width, ("batch", "none")))
        acts.append("none")
    return ConvBranch(tuple(convs), tuple(norms), tuple(acts))


def _block(draw: Draw, width: int, size: int, tokens: bool) -> Block:
    kinds = ("mlp", "attention", "mlp", "act") if tokens else ("conv", "conv", "cat", "split", "mlp", "act", "pool")
    kind = draw.pick(kinds)
    if kind == "conv":
        return _conv_branch(draw, width)
    if kind == "cat":
        return CatBranch(_width(draw), _width(draw), draw.pick(ACTIVATIONS))
    if kind == "split":
        how = draw.pick(("split", "chunk", "slice", "narrow"))
        a = _width(draw)
        b = a if how == "chunk" else _width(draw)
        return SplitBranch(a, b, how, draw.pick(("add", "cat", "drop")), draw.pick(ACTIVATIONS))
    if kind == "mlp":
        return MlpBranch(_width(draw), draw.pick(ACTIVATIONS), draw.int(0, 3) == 0)
    if kind == "attention":
        kv = draw.pick((1, 2))
        return AttentionBranch(kv * draw.pick((1, 2)), kv, draw.pick((2, 4)), draw.int(0, 1) == 1,
                               draw.int(0, 1) == 1, draw.int(0, 3) == 0)
    if kind == "pool" and size >= 4:
        return StreamOp(draw.pick(("maxpool", "avgpool")))
    return StreamOp(draw.pick(ACTIVATIONS))


def draw_spec(draw: Draw) -> ModelSpec:
    """A random architecture: 1-2 conv stages of 0-2 blocks, maybe a token block, a linear head.
    Small, because ``torch.export`` costs about 10 ms per graph node and ``make fuzz`` runs 10,000."""
    cin, size = draw.pick((1, 3)), draw.pick((4, 6))
    in_channels, in_size = cin, size
    stages = []
    for _ in range(draw.pick((1, 1, 2))):
        stem, size = _stem(draw, cin, size)
        width = stem.out
        blocks = []
        for _ in range(draw.int(0, 2)):
            block = _block(draw, width, size, tokens=False)
            if isinstance(block, StreamOp) and block.kind.endswith("pool"):
                size //= 2
            blocks.append(block)
        stages.append(StageSpec(stem, _norm(draw, width, ("batch", "none")), tuple(blocks)))
        cin = width
    tokens = (_block(draw, cin, size, tokens=True),) if draw.int(0, 2) == 0 else ()
    head_pool = 0 if tokens else draw.pick((0, 1, 2))
    return ModelSpec(in_channels, in_size, tuple(stages), tokens, head_pool, draw.pick((2, 3)),
                     draw.int(0, 2**31 - 1), draw.int(0, 2**31 - 1))


# -- channel groups: what the generator knows --------------------------------------------------
Zeroer = Callable[[int], None]


def _noop(c: int) -> None:
    return None


@dataclass
class Producer:
    """One op that writes a group's channels: ``zero(c)`` makes channel ``c`` of its output zero
    whatever its input (and so its input is ignored there); ``keep(c)`` makes a zero input stay
    zero. ``decoy(c)`` zeroes something that does *not* make ``c`` removable."""

    zero: Zeroer
    keep: Zeroer
    decoy: Zeroer = _noop


@dataclass
class Slot:
    """A parameter dim that carries the group: channel ``c`` is ``indices(c)`` along ``dim``."""

    param: torch.Tensor
    dim: int
    indices: Callable[[int], list[int]]


@dataclass
class Group:
    """A set of channels that live or die together, as the generator built it.

    ``chains``: every path that writes the channels, producers in order; ``consumers`` zero a
    channel's input slice in each op that reads the group from outside it; ``ties``: channel pairs
    that must go together (grouped convolutions, group norm); ``segments``: channel ranges that
    are dims of their own (split pieces, concatenated parts), each of which the analysis never
    empties; ``dead``: channels nothing reads (unused split pieces).
    """

    name: str
    width: int
    chains: list[list[Producer]] = field(default_factory=list)
    consumers: list[Zeroer] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    ties: list[tuple[int, int]] = field(default_factory=list)
    segments: list[range] = field(default_factory=list)
    dead: set[int] = field(default_factory=set)
    keeps_zero: bool = True  # every op on the way keeps a zero channel zero
    strict: bool = False  # no barrier can touch these channels: ``kept_because`` excuses nothing
    normalised: bool = False  # a layer norm mixes the channels: nothing may go (by design)
    removable: set[int] = field(default_factory=set)  # filled in by the zero pattern

    def tie_period(self, period: int) -> None:
        """Channel ``c`` and ``c + period`` go together (position ``j`` of every conv group)."""
        self.ties += [(c, c + period) for c in range(self.width - period)]

    def tie_blocks(self, size: int) -> None:
        """Blocks of ``size`` channels go together (the groups of a group norm)."""
        self.ties += [(c, c + 1) for c in range(self.width - 1) if (c + 1) % size]

    def classes(self) -> list[list[int]]:
        parent = list(range(self.width))

        def root(c: int) -> int:
            while parent[c] != c:
                parent[c] = parent[parent[c]]
                c = parent[c]
            return c

        for a, b in self.ties:
            parent[root(a)] = root(b)
        found: dict[int, list[int]] = {}
        for c in range(self.width):
            found.setdefault(root(c), []).append(c)
        return list(found.values())


def _rows(t: torch.Tensor, index_of: Callable[[int], list[int]] | None = None, dim: int = 0) -> Zeroer:
    def zero(c: int) -> None:
        with torch.no_grad():
            t.index_fill_(dim, torch.tensor(index_of(c) if index_of else [c]), 0.0)

    return zero


def _both(*fns: Zeroer | None) -> Zeroer:
    def run(c: int) -> None:
        for fn in fns:
            if fn is not None:
                fn(c)

    return run


# -- building ----------------------------------------------------------------------------------
def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    simple = {"half": lambda t: t * 0.5, "square": lambda t: t * t, "plus_one": lambda t: t + 1.0,
              "neg": torch.neg, "abs": torch.abs, "cos": torch.cos, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
    if name == "none":
        return x
    if name in simple:
        return simple[name](x)
    return getattr(F, name)(x)


class Builder:
    """Builds modules for a spec and records the channel groups they create."""

    def __init__(self) -> None:
        self.groups: list[Group] = []

    def group(self, name: str, width: int) -> Group:
        g = Group(name, width)
        g.segments.append(range(width))
        self.groups.append(g)
        return g

    # each method returns the module(s) and the group its output channels belong to
    def conv(self, spec: ConvSpec, cin: int, src: Group | None, name: str, into: Group | None = None
             ) -> tuple[nn.Module, Group]:
        """A conv reading ``src`` (``None``: the model input) and writing a new group, or a new
        chain into ``into`` (a branch's last conv writes the stream). Depthwise convs stay in
        ``src``."""
        padding = spec.dilation * (spec.kernel - 1) // 2
        if spec.kind == "transposed":
            m = nn.ConvTranspose2d(cin, spec.out, spec.kernel, spec.stride, groups=spec.groups, bias=spec.bias)
        else:
            m = nn.Conv2d(cin, spec.out, spec.kernel, spec.stride, padding, spec.dilation, spec.groups, spec.bias)
        w, b = m.weight, m.bias
        bias = _rows(b) if b is not None else None
        if spec.kind == "depthwise":  # a decoy zeroes the weight and leaves the bias: a constant
            src.chains[-1].append(Producer(_both(_rows(w), bias), bias or _noop, _rows(w) if bias else _noop))
            src.slots.append(Slot(w, 0, lambda c: [c]))
            return m, src
        ipg, opg = cin // spec.groups, spec.out // spec.groups
        if src is not None:
            if spec.kind == "transposed":
                src.consumers.append(_rows(w))
                src.slots.append(Slot(w, 0, lambda c: [c]))
            else:
                src.consumers.append(_rows(w, None, 1) if spec.groups == 1 else _grouped_columns(w, ipg, opg))
                src.slots.append(Slot(w, 1, lambda c: [c % ipg]))
            if spec.groups > 1:
                src.tie_period(ipg)
        out = into if into is not None else self.group(name, spec.out)
        if spec.kind == "transposed":  # weight [in, out/g]: output c is column c % opg
            zero_w = _rows(w, lambda c: [c % opg], 1)
            out.slots.append(Slot(w, 1, lambda c: [c % opg]))
        else:
            zero_w = _rows(w)
            out.slots.append(Slot(w, 0, lambda c: [c]))
        if spec.groups > 1:
            out.tie_period(opg)
        out.chains.append([Producer(_both(zero_w, bias), bias or _noop, bias or _noop)])
        return m, out

    def norm(self, spec: NormSpec | None, width: int, g: Group) -> nn.Module:
        """A norm on ``g``'s channels: a producer (zeroed by its scale and shift)."""
        if spec is None:
            return nn.Identity()
        if spec.kind == "layer":
            g.normalised = True
            return nn.LayerNorm(width)
        m = nn.BatchNorm2d(width) if spec.kind == "batch" else nn.GroupNorm(spec.groups, width)
        if spec.kind == "group":
            g.tie_blocks(width // spec.groups)
        w, b = m.weight, m.bias
        mean = getattr(m, "running_mean", None)
        keep = _both(_rows(b), _rows(mean) if mean is not None else None)
        g.chains[-1].append(Producer(_both(_rows(w), _rows(b)), keep, _rows(w)))
        g.slots += [Slot(w, 0, lambda c: [c]), Slot(b, 0, lambda c: [c])]
        return m

    def linear(self, cin: int, out: int, src: Group, name: str, into: Group | None = None,
               columns: Callable[[int], list[int]] | None = None) -> tuple[nn.Linear, Group]:
        """A linear layer reading ``src`` (channel ``c`` is input features ``columns(c)``)."""
        m = nn.Linear(cin, out)
        cols = columns or (lambda c: [c])
        src.consumers.append(_rows(m.weight, cols, 1))
        src.slots.append(Slot(m.weight, 1, cols))
        g = into if into is not None else self.group(name, out)
        bias = _rows(m.bias)
        g.chains.append([Producer(_both(_rows(m.weight), bias), bias, bias)])
        g.slots.append(Slot(m.weight, 0, lambda c: [c]))
        return m, g


def _grouped_columns(w: torch.Tensor, ipg: int, opg: int) -> Zeroer:
    """Input channel ``c`` of a grouped conv: column ``c % ipg`` of its group's rows."""

    def zero(c: int) -> None:
        with torch.no_grad():
            w[(c // ipg) * opg:(c // ipg + 1) * opg, c % ipg] = 0.0

    return zero

# -- modules -----------------------------------------------------------------------------------
class Act(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _activation(self.name, x)


class Residual(nn.Module):
    """``x + body(x)``; ``channel_last`` runs the body on ``x.permute(0, 2, 3, 1)``."""

    def __init__(self, body: nn.Module, channel_last: bool = False) -> None:
        super().__init__()
        self.body, self.channel_last = body, channel_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_last:
            return x + self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.body(x)


class Cat(nn.Module):
    def __init__(self, p: nn.Module, q: nn.Module, act: str, last: nn.Module) -> None:
        super().__init__()
        self.p, self.q, self.act, self.last = p, q, Act(act), last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.act(torch.cat([self.p(x), self.q(x)], dim=1)))


class Split(nn.Module):
    def __init__(self, spec: SplitBranch, first: nn.Module, p: nn.Module, q: nn.Module | None) -> None:
        super().__init__()
        self.spec, self.first, self.act, self.p, self.q = spec, first, Act(spec.act), p, q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, (a, b) = self.first(x), (self.spec.a, self.spec.b)
        if self.spec.how == "split":
            ya, yb = torch.split(y, [a, b], dim=1)
        elif self.spec.how == "chunk":
            ya, yb = y.chunk(2, dim=1)
        elif self.spec.how == "slice":
            ya, yb = y[:, :a], y[:, a:]
        else:
            ya, yb = y.narrow(1, 0, a), y.narrow(1, a, b)
        ya, yb = self.act(ya), self.act(yb)
        if self.spec.merge == "cat":
            return self.p(torch.cat([ya, yb], dim=1))
        if self.spec.merge == "add":
            return self.p(ya) + self.q(yb)
        return self.p(ya)  # ``yb`` is computed and dropped: a dead branch


class Attention(nn.Module):
    def __init__(self, spec: AttentionBranch, width: int) -> None:
        super().__init__()
        self.spec = spec
        self.norm = nn.LayerNorm(width) if spec.layer_norm else nn.Identity()
        q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        self.sizes = [q, kv, kv]
        if spec.fused:
            self.qkv = nn.Linear(width, q + 2 * kv)
        else:
            self.q, self.k, self.v = nn.Linear(width, q), nn.Linear(width, kv), nn.Linear(width, kv)
        self.o = nn.Linear(q, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        y = self.norm(x)
        q, k, v = self.qkv(y).split(self.sizes, dim=-1) if self.spec.fused else (self.q(y), self.k(y), self.v(y))
        d = self.spec.head_dim
        q = q.view(n, length, self.spec.heads, d).transpose(1, 2)
        k = k.view(n, length, self.spec.kv_heads, d).transpose(1, 2)
        v = v.view(n, length, self.spec.kv_heads, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.spec.causal,
                                           enable_gqa=self.spec.heads != self.spec.kv_heads)
        return x + self.o(o.transpose(1, 2).reshape(n, length, self.spec.heads * d))


class Tokens(nn.Module):
    """``[N, C, H, W] -> [N, H*W, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class Head(nn.Module):
    """Flatten (after an adaptive pool, for a conv stream) into a linear classifier."""

    def __init__(self, pool: int, linear: nn.Linear) -> None:
        super().__init__()
        self.pool, self.linear = pool, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool:
            x = F.adaptive_avg_pool2d(x, self.pool)
        return self.linear(x.reshape(x.shape[0], -1))


class TokenHead(nn.Module):
    """The mean over tokens into a linear classifier."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(1))


class Pool(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2) if self.kind == "maxpool" else F.avg_pool2d(x, 2, ceil_mode=True)


# -- spec -> module + groups -------------------------------------------------------------------
@dataclass
class Case:
    """A built case: the model (eval mode, zeros applied), its example input and its groups."""

    spec: ModelSpec
    model: nn.Module
    example: torch.Tensor
    groups: list[Group]


def _seq(*modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(*(m for m in modules if not isinstance(m, nn.Identity)))


def _act(name: str, g: Group) -> nn.Module:
    if name in NOT_ZERO_KEEPING:
        g.keeps_zero = False
    return nn.Identity() if name == "none" else Act(name)


def _offset(a: int, first: Zeroer, second: Zeroer) -> Zeroer:
    return lambda c: first(c) if c < a else second(c - a)


def _conv_branch_module(b: Builder, spec: ConvBranch, stream: Group, width: int, name: str) -> nn.Module:
    layers, g, cin = [], stream, width
    for i, (conv_spec, norm_spec, act) in enumerate(zip(spec.convs, spec.norms, spec.acts, strict=True)):
        last = i == len(spec.convs) - 1
        conv, g = b.conv(conv_spec, cin, g, f"{name}.{i}", into=stream if last else None)
        layers += [conv, b.norm(norm_spec, conv_spec.out, g), _act(act, g)]
        cin = conv_spec.out
    return Residual(_seq(*layers))


def _cat_module(b: Builder, spec: CatBranch, stream: Group, width: int, name: str) -> nn.Module:
    g = b.group(name, spec.a + spec.b)
    g.segments += [range(spec.a), range(spec.a, spec.a + spec.b)]
    p, q = nn.Conv2d(width, spec.a, 1), nn.Conv2d(width, spec.b, 1)
    for m, rows in ((p, lambda c: [c] if c < spec.a else []), (q, lambda c: [c - spec.a] if c >= spec.a else [])):
        stream.consumers.append(_rows(m.weight, None, 1))
        stream.slots.append(Slot(m.weight, 1, lambda c: [c]))
        g.slots.append(Slot(m.weight, 0, rows))
    zero = _offset(spec.a, _both(_rows(p.weight), _rows(p.bias)), _both(_rows(q.weight), _rows(q.bias)))
    keep = _offset(spec.a, _rows(p.bias), _rows(q.bias))
    g.chains.append([Producer(zero, keep, keep)])
    act = spec.act
    if act in NOT_ZERO_KEEPING:
        g.keeps_zero = False
    last, _ = b.conv(ConvSpec("dense", width, 1), spec.a + spec.b, g, name, into=stream)
    return Residual(Cat(p, q, act, last))


def _split_module(b: Builder, spec: SplitBranch, stream: Group, width: int, name: str) -> nn.Module:
    first, g = b.conv(ConvSpec("dense", spec.a + spec.b, 1), width, stream, name)
    g.segments += [range(spec.a), range(spec.a, spec.a + spec.b)]
    if spec.act in NOT_ZERO_KEEPING:
        g.keeps_zero = False
    if spec.merge == "cat":
        p, _ = b.conv(ConvSpec("dense", width, 1), spec.a + spec.b, g, name, into=stream)
        return Residual(Split(spec, first, p, None))
    a_part, b_part = Group(name, spec.a), Group(name, spec.b)  # scratch: where p and q read
    p, _ = b.conv(ConvSpec("dense", width, 1), spec.a, a_part, name, into=stream)
    q = None
    if spec.merge == "add":
        q, _ = b.conv(ConvSpec("dense", width, 1), spec.b, b_part, name, into=stream)
    else:
        g.dead |= set(range(spec.a, spec.a + spec.b))
    g.consumers.append(_offset(spec.a, a_part.consumers[0], b_part.consumers[0] if q is not None else _noop))
    g.slots.append(Slot(p.weight, 1, lambda c: [c] if c < spec.a else []))
    if q is not None:
        g.slots.append(Slot(q.weight, 1, lambda c: [c - spec.a] if c >= spec.a else []))
    return Residual(Split(spec, first, p, q))


def _mlp_module(b: Builder, spec: MlpBranch, stream: Group, width: int, name: str, channel_last: bool) -> nn.Module:
    norm = b.norm(NormSpec("layer") if spec.layer_norm else None, width, stream)
    fc1, g = b.linear(width, spec.hidden, stream, name)
    act = _act(spec.act, g)
    fc2, _ = b.linear(spec.hidden, width, g, name, into=stream)
    return Residual(_seq(norm, fc1, act, fc2), channel_last)


def _attention_module(b: Builder, spec: AttentionBranch, stream: Group, width: int, name: str) -> nn.Module:
    """Key/value head ``j`` and its query heads are one unit: zero its ``v`` rows, or ignore its
    heads in the output projection, and the whole unit can go."""
    m = Attention(spec, width)
    if spec.layer_norm:
        stream.normalised = True
    d, per = spec.head_dim, spec.heads // spec.kv_heads
    nq, nkv = spec.heads * d, spec.kv_heads * d
    q_rows = lambda j: list(range(j * per * d, (j + 1) * per * d))  # noqa: E731
    kv_rows = lambda j: list(range(j * d, (j + 1) * d))  # noqa: E731
    projections = [m.qkv] if spec.fused else [m.q, m.k, m.v]
    for linear in projections:
        stream.consumers.append(_rows(linear.weight, None, 1))
        stream.slots.append(Slot(linear.weight, 1, lambda c: [c]))
    g = b.group(name, spec.kv_heads)
    g.strict = True  # the pinned head_dim shares the group's dims, so it always has a kept_because
    if spec.fused:
        q_at, k_at, v_at = (m.qkv, q_rows), (m.qkv, lambda j: [nq + r for r in kv_rows(j)]), \
            (m.qkv, lambda j: [nq + nkv + r for r in kv_rows(j)])
        g.slots.append(Slot(m.qkv.weight, 0, lambda j: q_at[1](j) + k_at[1](j) + v_at[1](j)))
    else:
        q_at, k_at, v_at = (m.q, q_rows), (m.k, kv_rows), (m.v, kv_rows)
        g.slots += [Slot(m.q.weight, 0, q_rows), Slot(m.k.weight, 0, kv_rows), Slot(m.v.weight, 0, kv_rows)]
    v_bias = _rows(v_at[0].bias, v_at[1])
    first_query_head = lambda j: q_at[1](j)[:d]  # noqa: E731
    decoy = _both(_rows(q_at[0].weight, first_query_head), _rows(q_at[0].bias, first_query_head))
    g.chains.append([Producer(_both(_rows(v_at[0].weight, v_at[1]), v_bias), v_bias, decoy)])
    g.consumers.append(_rows(m.o.weight, q_rows, 1))
    g.slots.append(Slot(m.o.weight, 1, q_rows))
    out_bias = _rows(m.o.bias)
    stream.chains.append([Producer(_both(_rows(m.o.weight), out_bias), out_bias, out_bias)])
    stream.slots.append(Slot(m.o.weight, 0, lambda c: [c]))
    return m


def _block_module(b: Builder, block: Block, stream: Group, width: int, name: str, tokens: bool) -> nn.Module:
    if isinstance(block, ConvBranch):
        return _conv_branch_module(b, block, stream, width, name)
    if isinstance(block, CatBranch):
        return _cat_module(b, block, stream, width, name)
    if isinstance(block, SplitBranch):
        return _split_module(b, block, stream, width, name)
    if isinstance(block, MlpBranch):
        return _mlp_module(b, block, stream, width, name, channel_last=not tokens)
    if isinstance(block, AttentionBranch):
        return _attention_module(b, block, stream, width, name)
    if block.kind in ("maxpool", "avgpool"):
        return Pool(block.kind)
    return _act(block.kind, stream)


def _randomise_statistics(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
        if isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))


def build(spec: ModelSpec) -> Case:
    """The spec's model with its zero pattern applied, in eval mode."""
    torch.manual_seed(spec.weight_seed)
    b = Builder()
    layers: list[nn.Module] = []
    cin, src = spec.in_channels, None
    for s, stage in enumerate(spec.stages):
        stem, stream = b.conv(stage.stem, cin, src, f"stage{s}")
        layers += [stem, b.norm(stage.stem_norm, stage.stem.out, stream)]
        width = stage.stem.out
        for i, block in enumerate(stage.blocks):
            layers.append(_block_module(b, block, stream, width, f"stage{s}.{i}", tokens=False))
        cin, src = width, stream
    size = _spatial(spec)
    if spec.tokens:
        layers.append(Tokens())
        for i, block in enumerate(spec.tokens):
            layers.append(_block_module(b, block, src, cin, f"tokens.{i}", tokens=True))
        linear = nn.Linear(cin, spec.classes)
        cols = lambda c: [c]  # noqa: E731
        head = TokenHead(linear)
    else:
        per = spec.head_pool**2 if spec.head_pool else size * size
        linear = nn.Linear(per * cin, spec.classes)
        cols = lambda c: list(range(c * per, (c + 1) * per))  # noqa: E731
        head = Head(spec.head_pool, linear)
    src.consumers.append(_rows(linear.weight, cols, 1))
    src.slots.append(Slot(linear.weight, 1, cols))
    layers.append(head)
    model = _seq(*layers).eval()
    gen = torch.Generator().manual_seed(spec.weight_seed)
    _randomise_statistics(model, gen)
    apply_zeros(b.groups, model, random.Random(spec.zero_seed))
    example = torch.randn((2, spec.in_channels, spec.size, spec.size), generator=gen)
    return Case(spec, model, example, b.groups)


def _spatial(spec: ModelSpec) -> int:
    """The spatial size after the conv stages (by running shapes, the simplest truth)."""
    size = spec.size
    for stage in spec.stages:
        stem = stage.stem
        if stem.kind == "transposed":
            size = (size - 1) * stem.stride + stem.kernel
        else:
            pad = stem.dilation * (stem.kernel - 1) // 2
            size = (size + 2 * pad - stem.dilation * (stem.kernel - 1) - 1) // stem.stride + 1
        for block in stage.blocks:
            if isinstance(block, StreamOp) and block.kind == "maxpool":
                size //= 2
            elif isinstance(block, StreamOp) and block.kind == "avgpool":
                size = (size + 1) // 2
    return size


# -- zero patterns -----------------------------------------------------------------------------
def apply_zeros(groups: list[Group], model: nn.Module, rng: random.Random) -> None:
    """Make random classes of every group removable (``zero`` or ``dead``), put decoys on
    others, and scatter hand zeros over a few weights. Fills in each group's ``removable``."""
    for g in groups:
        for cls in g.classes():
            r = rng.random()
            if all(c in g.dead for c in cls):
                g.removable.update(cls)
            elif r < 0.25 and g.keeps_zero and g.chains and not g.normalised:
                for chain in g.chains:
                    i = rng.randrange(len(chain))
                    for c in cls:
                        chain[i].zero(c)
                        for later in chain[i + 1:]:
                            later.keep(c)
                g.removable.update(cls)
            elif r < 0.5 and not g.normalised:
                for consumer in g.consumers:
                    for c in cls:
                        consumer(c)
                g.removable.update(cls)
            elif r < 0.7 and g.chains:
                chain = rng.choice(g.chains)
                for c in cls:
                    rng.choice(chain).decoy(c)
    weights = [p for p in model.parameters() if p.dim() > 1]
    for p in rng.sample(weights, k=min(len(weights), rng.randint(0, 2))):
        with torch.no_grad():
            noise = torch.rand(p.shape, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
            p.masked_fill_(noise < 0.2, 0.0)


# -- checks ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one case found: failures (empty when it passed) and how much the oracle checked."""

    failures: list[str] = field(default_factory=list)
    checked: int = 0  # parameter dims whose size the oracle bounded
    excused: int = 0  # parameter dims skipped because their group reports kept_because
    removed: int = 0
    reasons: list[str] = field(default_factory=list)


def compare(reference: Callable, candidate: Callable, inputs: Sequence[torch.Tensor], rtol: float = 1e-5) -> list[str]:
    """Mismatches of ``candidate`` against ``reference``: max |a - b| above ``rtol`` of max |a|
    per output, or a NaN / Inf where the reference has none (or the other way round)."""
    problems = []
    with torch.no_grad():
        for n, x in enumerate(inputs):
            ref, out = reference(x), candidate(x)
            if ref.shape != out.shape:
                problems.append(f"input {n}: shape {tuple(out.shape)} != {tuple(ref.shape)}")
                continue
            finite = torch.isfinite(ref)
            same_specials = torch.equal(ref[~finite].nan_to_num(), out[~finite].nan_to_num())
            if not torch.equal(finite, torch.isfinite(out)) or not same_specials:
                problems.append(f"input {n}: non-finite values differ")
                continue
            scale = ref[finite].abs().max().item() if finite.any() else 0.0
            error = (ref[finite].double() - out[finite].double()).abs().max().item() if finite.any() else 0.0
            if error > rtol * max(scale, 1e-12):
                problems.append(f"input {n}: max abs error {error:.3g} > {rtol:g} * {scale:.3g}")
    return problems


def check_oracle(case: Case, stripped: nn.Module, summary: StripSummary) -> Outcome:
    """Every parameter dim that carries a group with removable channels must have lost them:
    stripped size <= size - (indices of removable channels) + one class per segment that is
    entirely removable (the analysis keeps one channel of a dim it would empty), unless the
    summary group that carries the dim says why it was kept."""
    outcome = Outcome()
    names = {id(p): n for n, p in case.model.named_parameters()}
    after = dict(stripped.named_parameters())
    excuses = {carrier: g.kept_because for g in summary.groups for carrier in g.carriers}
    for g in case.groups:
        if not g.removable or g.normalised:
            continue
        classes = g.classes()
        full = sum(1 for seg in g.segments if set(seg) <= g.removable)
        for slot in g.slots:
            name = names[id(slot.param)]
            key = f"{name}:{slot.dim}"
            if name not in after:
                continue  # not in the graph at all (export dropped it)
            if excuses.get(key) and not g.strict:
                outcome.excused += 1
                outcome.reasons.append(excuses[key])
                continue
            removed = {i for c in g.removable for i in slot.indices(c)}
            widest = max(len({i for c in cls for i in slot.indices(c)}) for cls in classes)
            bound = slot.param.shape[slot.dim] - len(removed) + full * widest
            size = after[name].shape[slot.dim]
            outcome.checked += 1
            if size > bound:
                outcome.failures.append(
                    f"oracle: {key} kept {size} of {slot.param.shape[slot.dim]}, at most {bound} expected "
                    f"(group {g.name}: channels {sorted(g.removable)} of {g.width} are zero or dead)")
    return outcome


def fresh_inputs(case: Case, count: int = 3) -> list[torch.Tensor]:
    """Inputs the strip pass never saw (it verifies on the example and its own seeded ones)."""
    gen = torch.Generator().manual_seed(case.spec.weight_seed + 1)
    return [torch.randn(case.example.shape, generator=gen) * 3 for _ in range(count)]


def run_case(spec: ModelSpec, strip: Callable | None = None) -> Outcome:
    """Build, strip (``ctk.strip`` unless given), compare on fresh inputs, and check the oracle.
    A crash or a verification error of the strip pass itself is a failure too."""
    import traceback

    from compile_toolkit.strip import strip as ctk_strip
    from compile_toolkit.strip import strip_summary

    case = build(spec)
    try:
        stripped = (strip or ctk_strip)(case.model, (case.example,))
    except Exception as error:  # noqa: BLE001 - any exception is a finding, reported with its trace
        tail = "".join(traceback.format_exception(error)[-3:]).strip()
        return Outcome(failures=[f"strip raised {type(error).__name__}: {tail}"])
    summary = strip_summary(stripped)
    outcome = check_oracle(case, stripped, summary)
    outcome.removed = summary.channels_removed
    outcome.failures += compare(case.model, stripped, fresh_inputs(case))
    return outcome
