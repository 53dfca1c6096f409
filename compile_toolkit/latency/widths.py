"""Each channel group's kept width, chosen so that the predicted latency meets a budget and the
most importance is kept: a multiple-choice knapsack over groups (one width per group), costed by
the measured per-layer latency table.

The predicted latency of a choice is the sum over the compute layers of the table's latency at
the layer's input and output widths (:class:`LayerCosts`). A layer reads one group's width and
writes another's, so a group's cost depends on its neighbours' widths: the choice is made as HALP
does, each group costed with its neighbours' widths as currently chosen, and iterated. For a price
``lam`` per millisecond, coordinate ascent gives every group in turn the width that maximises
``importance - lam * latency`` of the layers it touches until no group changes (each step raises
that objective, so it ends); ``lam`` is bisected for the cheapest price that meets the budget. The
slack left is then filled greedily (the width step with the most importance per millisecond that
still fits), from that solution and from the widest uniform widths that fit, and the better is
kept, so the choice never keeps less importance than uniform widths at the same predicted latency.

Widths the runtime runs badly are never chosen: a width whose cost (the measured latency of the
layers the group touches, neighbours as chosen) is not below that of every wider candidate is
dominated (a wider one is as fast and keeps more) and is excluded at every step and in the result.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .layers import Dim, Layer
from .table import Cell, LatencyTable

MAX_SWEEPS = 30  # coordinate-ascent sweeps over the groups at one price (it usually settles in 3-6)
PRICE_STEPS = 30  # bisection steps of the price per millisecond


@dataclass(frozen=True)
class GroupOption:
    """A group whose width is chosen: its channel count, the candidate widths (ascending, the
    widest being ``size``) and the importance kept at each (the sum of its kept channels' scores,
    the lowest-scoring removed first as ``ctk.prune`` removes them)."""

    index: int  # the group's index in the channel analysis
    size: int
    widths: tuple[int, ...]
    importance: tuple[float, ...]


@dataclass(frozen=True)
class Choice:
    """Chosen widths (one per group option, in order), their predicted latency and importance."""

    widths: tuple[int, ...]
    predicted_ms: float
    importance: float


def candidate_widths(size: int, smallest: int, points: int, align: int = 8) -> tuple[int, ...]:
    """``points`` widths from ``size / points`` to ``size`` in equal steps, each rounded to a
    multiple of ``align`` where the step is at least that wide, none below ``smallest`` (the
    channels that must stay, and the most pruning allowed); ``size`` itself always. Uniform fractions ``k / points`` are on it."""
    widths = {size}
    for k in range(1, points):
        width = size * k / points
        if size / points >= align:
            width = align * round(width / align)
        widths.add(max(1, round(width)))
    return tuple(sorted(w for w in widths if w >= min(smallest, size)))


def uniform_picks(options: Sequence[GroupOption], fraction: float) -> list[int]:
    """Each option's candidate nearest ``fraction`` of its size (the wider one on a tie), by index."""
    return [min(range(len(o.widths)), key=lambda j, o=o: (abs(o.widths[j] - fraction * o.size), -j)) for o in options]


def undominated(costs: Sequence[float]) -> list[bool]:
    """Whether each candidate (ascending widths) is cheaper than every wider one: a width whose
    measured cost is not below a wider candidate's is one the runtime runs badly."""
    allowed = [True] * len(costs)
    cheapest = math.inf
    for j in range(len(costs) - 1, -1, -1):
        allowed[j] = costs[j] < cheapest
        cheapest = min(cheapest, costs[j])
    return allowed


class LayerCosts:
    """Predicted milliseconds of each layer at any widths, from the table's cells on the grid of
    its input and output widths (each dim's grid: its group's candidate widths; interpolated
    linearly between cells where a dim mixes groups)."""

    def __init__(self, layers: Sequence[Layer], options: Sequence[GroupOption], table: LatencyTable) -> None:
        self.layers = list(layers)
        self.sizes = [o.size for o in options]
        self._grids = _grids(self.layers, options)
        table.ensure(_cells(self.layers, self._grids))
        self._ms = [np.array([[table.ms(layer.geometry, *_widths(layer, cin, cout)) for cout in outs] for cin in ins])
                    for layer, (ins, outs) in zip(self.layers, self._grids, strict=True)]

    def layer_ms(self, i: int, widths: Sequence[int]) -> float:
        layer = self.layers[i]
        return self.ms(i, layer.cin.width(widths, self.sizes), layer.cout.width(widths, self.sizes))

    def ms(self, i: int, cin: int, cout: int) -> float:
        ins, outs = self._grids[i]
        if self.layers[i].geometry.depthwise:
            cin = ins[0]
        return _bilinear(ins, outs, self._ms[i], cin, cout)

    def total(self, widths: Sequence[int]) -> float:
        return sum(self.layer_ms(i, widths) for i in range(len(self.layers)))


def table_cells(layers: Sequence[Layer], options: Sequence[GroupOption]) -> list[Cell]:
    """Every table cell that costing ``layers`` at the options' widths needs (a depthwise layer's
    widths are one)."""
    return _cells(layers, _grids(layers, options))


def _cells(layers: Sequence[Layer], grids: Sequence[tuple[list[int], list[int]]]) -> list[Cell]:
    return sorted({(layer.geometry, *_widths(layer, cin, cout)) for layer, (ins, outs)
                   in zip(layers, grids, strict=True) for cin in ins for cout in outs},
                  key=lambda c: (c[0].key(), c[1], c[2]))


def _grids(layers: Sequence[Layer], options: Sequence[GroupOption]) -> list[tuple[list[int], list[int]]]:
    return [(_grid(layer.cin, options), _grid(layer.cout, options)) for layer in layers]


def _grid(dim: Dim, options: Sequence[GroupOption]) -> list[int]:
    """The widths a dim is measured at: its group's candidates where it is one whole group, its
    size where no chosen group touches it, else its own grid from its smallest width to its size."""
    if not dim.parts:
        return [dim.size]
    if len(dim.parts) == 1 and not dim.fixed and dim.parts[0][1] == options[dim.parts[0][0]].size:
        return list(options[dim.parts[0][0]].widths)
    smallest = dim.width([options[g].widths[0] for g in range(len(options))], [o.size for o in options])
    points = max(len(options[g].widths) for g in dim.groups())
    return sorted({round(smallest + (dim.size - smallest) * k / (points - 1 or 1)) for k in range(points)})


def _widths(layer: Layer, cin: int, cout: int) -> tuple[int, int]:
    """A cell's (input, output) widths: a depthwise layer has one width."""
    return (cout, cout) if layer.geometry.depthwise else (cin, cout)


def _bilinear(xs: list[int], ys: list[int], values: np.ndarray, x: float, y: float) -> float:
    i, a = _bracket(xs, x)
    j, b = _bracket(ys, y)
    i2, j2 = (i + 1 if a else i), (j + 1 if b else j)
    return float((1 - a) * (1 - b) * values[i, j] + (1 - a) * b * values[i, j2]
                 + a * (1 - b) * values[i2, j] + a * b * values[i2, j2])


def _bracket(grid: list[int], value: float) -> tuple[int, float]:
    """(index, weight of the next point) of ``value`` on ``grid``, clamped to its ends."""
    if value <= grid[0] or len(grid) == 1:
        return 0, 0.0
    if value >= grid[-1]:
        return len(grid) - 1, 0.0
    k = bisect.bisect_right(grid, value) - 1
    return k, (value - grid[k]) / (grid[k + 1] - grid[k])


class WidthChooser:
    """The knapsack of the module docstring over ``options`` costed by ``costs``."""

    def __init__(self, options: Sequence[GroupOption], costs: LayerCosts) -> None:
        self.options = list(options)
        self.costs = costs
        self._touching = [[i for i, layer in enumerate(costs.layers) if g in layer.groups()]
                          for g in range(len(self.options))]

    def widths(self, picks: Sequence[int]) -> tuple[int, ...]:
        return tuple(o.widths[j] for o, j in zip(self.options, picks, strict=True))

    def choice(self, picks: Sequence[int]) -> Choice:
        widths = self.widths(picks)
        return Choice(widths, self.costs.total(widths), self._importance(picks))

    def dense(self) -> Choice:
        return self.choice([len(o.widths) - 1 for o in self.options])

    def smallest(self) -> Choice:
        """Every group at its narrowest width the runtime does not run badly."""
        return self.choice(self._undominated_fix([0] * len(self.options)))

    def uniform(self, fraction: float) -> Choice:
        """Every group at the candidate nearest ``fraction`` of its size (the same pruning everywhere)."""
        return self.choice(uniform_picks(self.options, fraction))

    def choose(self, budget_ms: float) -> Choice:
        """The widths that keep the most importance with a predicted latency within ``budget_ms``
        (the narrowest allowed widths where nothing fits)."""
        dense = [len(o.widths) - 1 for o in self.options]
        if self.costs.total(self.widths(dense)) <= budget_ms:
            return self.choice(dense)
        priced = self._priced(budget_ms)
        starts = [priced, self._widest_uniform(budget_ms)]
        best = [self._undominated_fix(self._fill(p, budget_ms)) for p in starts if p is not None]
        if not best:
            return self.smallest()
        return max((self.choice(p) for p in best), key=lambda c: (c.importance, -c.predicted_ms))

    def _importance(self, picks: Sequence[int]) -> float:
        return float(sum(o.importance[j] for o, j in zip(self.options, picks, strict=True)))

    def _local(self, g: int, picks: list[int]) -> list[float]:
        """The cost of each candidate width of group ``g`` (the layers it touches), others as in ``picks``."""
        saved = picks[g]
        costs = []
        for j in range(len(self.options[g].widths)):
            picks[g] = j
            widths = self.widths(picks)
            costs.append(sum(self.costs.layer_ms(i, widths) for i in self._touching[g]))
        picks[g] = saved
        return costs

    def _ascend(self, price: float) -> list[int]:
        """Coordinate ascent on ``importance - price * latency`` from the dense widths."""
        picks = [len(o.widths) - 1 for o in self.options]
        for _ in range(MAX_SWEEPS):
            changed = False
            for g, option in enumerate(self.options):
                costs = self._local(g, picks)
                allowed = undominated(costs)
                best = max((j for j in range(len(costs)) if allowed[j]),
                           key=lambda j: (option.importance[j] - price * costs[j], j))
                if best != picks[g]:
                    picks[g], changed = best, True
            if not changed:
                break
        return picks

    def _priced(self, budget_ms: float) -> list[int] | None:
        """The ascent's widths at the lowest price (bisected) whose latency meets ``budget_ms``."""
        dense = self.dense()
        high = max(dense.importance, 1e-12) / max(dense.predicted_ms, 1e-12)
        found = None
        for _ in range(40):  # the price that makes the ascent fit, found by doubling
            picks = self._ascend(high)
            if self.costs.total(self.widths(picks)) <= budget_ms:
                found = picks
                break
            high *= 4
        if found is None:
            return None
        low = 0.0
        for _ in range(PRICE_STEPS):
            middle = (low + high) / 2
            picks = self._ascend(middle)
            if self.costs.total(self.widths(picks)) <= budget_ms:
                high, found = middle, picks
            else:
                low = middle
        return found

    def _widest_uniform(self, budget_ms: float) -> list[int] | None:
        """The uniform widths of the largest fraction (on a fine grid) that fit ``budget_ms``."""
        for step in range(100, 0, -1):
            picks = uniform_picks(self.options, step / 100)
            if self.costs.total(self.widths(picks)) <= budget_ms:
                return picks
        return None

    def _fill(self, picks: list[int], budget_ms: float) -> list[int]:
        """Widen groups one candidate at a time, the most importance per millisecond first, while
        the predicted latency stays within ``budget_ms``."""
        picks = list(picks)
        total = self.costs.total(self.widths(picks))
        while True:
            best, best_rate = None, -math.inf
            for g, option in enumerate(self.options):
                if picks[g] == len(option.widths) - 1:
                    continue
                costs = self._local(g, picks)
                allowed = undominated(costs)
                wider = next((j for j in range(picks[g] + 1, len(costs)) if allowed[j]), None)
                if wider is None:
                    continue
                extra = costs[wider] - costs[picks[g]]
                if total + extra > budget_ms:
                    continue
                gain = option.importance[wider] - option.importance[picks[g]]
                rate = math.inf if extra <= 0 else gain / extra
                if rate > best_rate:
                    best, best_rate = (g, wider, extra), rate
            if best is None:
                return picks
            g, wider, extra = best
            picks[g] = wider
            total += extra

    def _undominated_fix(self, picks: list[int]) -> list[int]:
        """Move any group whose width is dominated (a wider candidate as fast or faster, neighbours
        as chosen) to the cheapest wider candidate: more importance, no more latency."""
        picks = list(picks)
        for _ in range(MAX_SWEEPS):
            changed = False
            for g in range(len(self.options)):
                costs = self._local(g, picks)
                if undominated(costs)[picks[g]]:
                    continue
                picks[g] = min(range(picks[g] + 1, len(costs)), key=lambda j: (costs[j], -j))
                changed = True
            if not changed:
                break
        return picks


def kept_importance(scores: np.ndarray, size: int, widths: Sequence[int],
                    order: np.ndarray | None = None) -> tuple[float, ...]:
    """The importance a group keeps at each width: all its scores but those of the ``size - width``
    channels removed, the lowest ``order`` first (default: the scores themselves, where the pruner
    ranks channels by what they are worth); channels that cannot be removed are not in ``scores``
    and count the same at every width."""
    scores = np.asarray(scores, dtype=np.float64)
    in_removal_order = scores[np.argsort(scores if order is None else order, kind="stable")]
    removed = np.concatenate([[0.0], np.cumsum(in_removal_order)])
    total = float(scores.sum())
    return tuple(total - float(removed[min(len(scores), size - w)]) for w in widths)
