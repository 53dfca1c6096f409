"""``ctk export --pruned --target-speedup X``: choose how much to prune by measuring, in the runtime
the model is deployed to and on this machine, instead of asking for a sparsity.

What a user wants is "2x faster where it runs", and FLOPs do not say what a runtime makes of a
width. So each candidate sparsity is a probe: a copy of the model pruned at that sparsity (every
coupled group alike, lowest importance first), stripped, exported and verified, then timed against
the dense model in the chosen runtime as the report's latency is (alternated rounds, median of
ratios). The probes bisect between no pruning and :data:`MAX_SPARSITY` for the smallest sparsity
that meets the target, which keeps the most channels; a target that even :data:`MAX_SPARSITY`
misses is one clear line before any fine-tuning. Widths there are uniform across groups.

:func:`choose_widths` chooses each group's width instead (issue 23): a knapsack over the coupled
groups (a causal LM's: each decoder layer's MLP neurons, key/value groups, or both) costed by a per-layer
latency table measured in the runtime and cached (:mod:`.latency`), then the same end-to-end
check as the probes: the stripped model exported and timed against the dense one; where the
measured speedup misses the band ``[1.02 * target, 1.1 * target]`` the latency budget is corrected from
the probes so far (latency is close to linear in the predicted latency) and the widths are chosen
again, a few rounds. ``ctk export`` takes this one; :func:`choose_sparsity` (uniform widths) is the
baseline the benchmarks compare it with.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from .capture import Inputs
from .errors import CtkError
from .exporters import export
from .latency.decoder import DECODER_WIDTHS, decoder_plan
from .latency.groups import width_plan
from .latency.plan import WidthPlan
from .latency.table import LatencyTable
from .latency.widths import Choice, LayerCosts, WidthChooser
from .metrics import RUNTIMES
from .pruning.configs import Channels, DecoderStructures
from .pruning.patterns import check_sparsity
from .pruning.prune_ import PruneData, prune_
from .strip import strip

MAX_SPARSITY = 0.9  # the most of every group a probe prunes
RESOLUTION = 0.05  # the bisection stops when the sparsity bracket is this narrow
WIDTH_POINTS = 8  # candidate widths per group: k/8 of its channels, multiples of 8 where that wide
TOLERANCE = 0.10  # the measured speedup of chosen widths lands in [target, (1 + TOLERANCE) * target]
# A choice measured within this share of either edge of the band is timed again (the job's report)
# past that edge about half the time (digits-resnet: 2.00x as a probe, 1.98x in the report at one
# thread; 1.649x and 1.650x for 1.5x at two), so the choice prefers probes in
# [(1 + MARGIN) * target, (1 + TOLERANCE - MARGIN) * target], and the budget correction aims at
# that band's middle.
MARGIN = 0.02
AIM = 1 + TOLERANCE / 2
WIDTH_ROUNDS = 4  # choices timed end to end after the smallest widths' probe
WALK = 1 / 32  # the budget's step, of the dense model's predicted latency, past widths already timed
# A probe's timing: this many alternated rounds, fewer where they would take longer than the budget.
# A small model needs many: digits-resnet runs in tens of microseconds, and 12 rounds of it (what
# probes had) measured 1.5x where the export's own 60 rounds then measured 1.42x.
PROBE_ROUNDS, PROBE_BUDGET_S = 100, 10.0


@dataclass(frozen=True)
class LatencyBudget:
    """A target given as a batch-1 latency in ms (``--target-latency-ms``) instead of a speedup:
    it becomes the speedup over the dense model as the runtime runs it here now, timed on the dense
    file the choice exports anyway."""

    ms: float

    def speedup(self, dense_file: str, inputs: Inputs, runtime: str) -> float:
        """The speedup over ``dense_file`` (timed in ``runtime`` on ``inputs``) that the budget asks
        for; one CtkError where the dense model already meets it."""
        dense_ms = RUNTIMES[runtime].latency_ms(dense_file, inputs)
        if dense_ms <= self.ms:
            raise CtkError(f"--target-latency-ms {self.ms:g}: the dense model already runs in {dense_ms:.3g} ms in "
                           f"{runtime} on this machine; nothing needs pruning (ask for less)")
        return dense_ms / self.ms


Target = float | LatencyBudget  # a speedup over the dense model, or a latency budget


@dataclass
class Probe:
    sparsity: float
    speedup: float


@dataclass
class TargetChoice:
    """The sparsity chosen for ``target`` speedup in ``runtime``, the speedup its probe measured,
    every probe in the order run, and the input shapes timed (a language model's prefill length)."""

    target: float
    runtime: str
    sparsity: float
    probe_speedup: float
    timed_inputs: list[list[int]] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_sparsity(module: nn.Module, example_inputs: Inputs, config: Channels | DecoderStructures, target: Target,
                    runtime: str, data: PruneData | None = None,
                    rounds: int = PROBE_ROUNDS, budget_s: float = PROBE_BUDGET_S,
                    max_sparsity: float = MAX_SPARSITY) -> TargetChoice:
    """The smallest sparsity of ``config`` (its own is ignored) whose stripped model runs ``target``
    times faster than ``module`` in ``runtime`` (a name of :data:`~compile_toolkit.metrics.RUNTIMES`,
    whose fp32 format is exported and timed at batch 1 on the example inputs: a language model's
    prefill at their length); ``target`` may be a :class:`LatencyBudget` instead. ``config``:
    channel groups, heads or neurons of the graph, or a causal LM's MLP neurons and key/value
    groups (:data:`DECODER_WIDTHS`, calibrated on ``data.tokens``); ``data``: what its pruner
    reads; ``max_sparsity``: the most it prunes (its first probe)."""
    _check_target(target, runtime)
    check_sparsity(max_sparsity, "max_sparsity")
    _check_structure(config)
    data = data or PruneData()
    batch1 = tuple(t[:1] for t in example_inputs)
    with tempfile.TemporaryDirectory(prefix="ctk-target-") as folder:
        dense = _exported(copy.deepcopy(module), example_inputs, runtime, Path(folder) / "dense")
        asked, target = target, _speedup(target, dense, batch1, runtime)
        choice = TargetChoice(target, runtime, max_sparsity, 0.0, [list(t.shape) for t in batch1])

        def probe(sparsity: float) -> float:
            pruned = copy.deepcopy(module)
            prune_(pruned, replace(config, sparsity=sparsity), replace(data, example_inputs=example_inputs))
            path = _exported(strip(pruned, example_inputs), example_inputs, runtime,
                             Path(folder) / f"probe{len(choice.probes)}", reference=pruned)
            speedup = RUNTIMES[runtime].compare(dense, path, batch1, rounds=rounds, budget_s=budget_s)["ratio"]
            choice.probes.append(Probe(sparsity, speedup))
            return speedup

        choice.probe_speedup = probe(max_sparsity)
        if choice.probe_speedup < target:
            raise CtkError(f"{_flag(asked, target)} cannot be met in {runtime} on this machine: pruning "
                           f"{max_sparsity:.0%} of every group runs only {choice.probe_speedup:.2f}x faster "
                           f"(ask for at most that)")
        low = 0.0
        while choice.sparsity - low > RESOLUTION:
            middle = round((low + choice.sparsity) / 2, 4)
            speedup = probe(middle)
            if speedup >= target:
                choice.sparsity, choice.probe_speedup = middle, speedup
            else:
                low = middle
    return choice


def _exported(module: nn.Module, example_inputs: Inputs, runtime: str, folder: Path,
              reference: nn.Module | None = None) -> str:
    """The verified file that ``runtime`` runs in fp32 (its format, exported) of ``module`` under ``folder``."""
    fmt = RUNTIMES[runtime].formats["fp32"]
    artifacts = export(module, example_inputs, str(folder), formats=(fmt,), reference=reference)
    return next(a.path for a in artifacts if a.format == fmt)


@dataclass
class WidthProbe:
    """One choice timed end to end: the predicted-latency budget it was chosen for, its predicted
    latency (ms, the table's sum) and the measured speedup of its stripped model."""

    budget_ms: float
    predicted_ms: float
    speedup: float


@dataclass
class WidthChoice:
    """Each group's width for ``target`` speedup in ``runtime``: ``config`` prunes them
    (``Channels`` with one override per group, or a causal LM's ``DecoderStructures`` with the
    units each layer keeps), ``widths`` say which (a carrier, channels, kept), ``sparsity`` is the
    share of the groups' channels removed, ``probe_speedup`` what the chosen widths measured;
    ``probes`` every end-to-end timing in order (the first: the smallest widths); ``table`` the
    latency table's file and how many cells this run measured; ``timed_inputs`` the input shapes
    timed (a language model's prefill length)."""

    target: float
    runtime: str
    precision: str
    sparsity: float
    probe_speedup: float
    predicted_ms: float
    dense_predicted_ms: float
    within_tolerance: bool
    widths: list[dict[str, Any]]
    probes: list[WidthProbe]
    table: dict[str, Any]
    timed_inputs: list[list[int]]
    config: Channels | DecoderStructures = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["config"]
        return data


def choose_widths(module: nn.Module, example_inputs: Inputs, config: Channels | DecoderStructures, target: Target,
                  runtime: str, data: PruneData | None = None,
                  rounds: int = PROBE_ROUNDS, budget_s: float = PROBE_BUDGET_S, precision: str = "fp32",
                  table: LatencyTable | None = None, max_sparsity: float = MAX_SPARSITY) -> WidthChoice:
    """Each group's width (every coupled channel group, or with structure ``neuron`` the groups of
    linear layers alone; a causal LM's MLP neurons, key/value groups or both in each decoder layer,
    ``DecoderStructures`` scored on ``data.tokens``) so that ``module``'s stripped model runs
    ``target`` times faster in ``runtime`` (within :data:`TOLERANCE` above), keeping the most
    importance; the arguments as :func:`choose_sparsity`'s. ``precision`` is what the latency
    table times (``int8`` where the deployed model is quantized); ``table`` a table to use
    (default: the runtime's cached one for this machine); ``max_sparsity`` the most of any group
    pruned (the narrowest width allowed). A target that even the narrowest widths miss is one
    CtkError after a single probe."""
    _check_target(target, runtime)
    check_sparsity(max_sparsity, "max_sparsity")
    data = replace(data or PruneData(), example_inputs=example_inputs)
    plan = _plan(module, example_inputs, config, data, max_sparsity)
    table = table or LatencyTable(runtime, precision)
    chooser = WidthChooser(plan.options, LayerCosts(plan.layers, plan.options, table))
    dense = chooser.dense()
    batch1 = tuple(t[:1] for t in example_inputs)
    probes: list[tuple[Choice, WidthProbe]] = []
    with tempfile.TemporaryDirectory(prefix="ctk-widths-") as folder:
        dense_file = _exported(copy.deepcopy(module), example_inputs, runtime, Path(folder) / "dense")
        asked, target = target, _speedup(target, dense_file, batch1, runtime)

        def probe(choice: Choice, budget_ms: float) -> float:
            pruned = copy.deepcopy(module)
            prune_(pruned, plan.config(choice.widths), data)
            path = _exported(strip(pruned, example_inputs), example_inputs, runtime,
                             Path(folder) / f"probe{len(probes)}", reference=pruned)
            speedup = RUNTIMES[runtime].compare(dense_file, path, batch1, rounds=rounds, budget_s=budget_s)["ratio"]
            probes.append((choice, WidthProbe(budget_ms, choice.predicted_ms, speedup)))
            return speedup

        smallest = chooser.smallest()
        if probe(smallest, smallest.predicted_ms) < target:
            raise CtkError(f"{_flag(asked, target)} cannot be met in {runtime} on this machine: the narrowest "
                           f"widths allowed (at most {max_sparsity:.0%} of every group pruned) run only "
                           f"{probes[0][1].speedup:.2f}x faster (ask for at most that)")
        for _ in range(WIDTH_ROUNDS):
            budget = _next_budget(dense.predicted_ms, [p for _, p in probes], target)
            walked = _untimed(chooser, budget, dense.predicted_ms, probes, target)
            if walked is None:
                break  # no widths left to time between those already timed
            if _in_band(probe(*walked), target):
                break
    return _width_choice(plan, target, runtime, precision, dense, probes, table, batch1)


def _plan(module: nn.Module, example_inputs: Inputs, config: Channels | DecoderStructures, data: PruneData,
          max_sparsity: float) -> WidthPlan:
    """The groups whose widths ``config`` lets the knapsack choose, with their layers."""
    _check_structure(config)
    if isinstance(config, Channels):
        return width_plan(module, example_inputs, config, data.calibration, WIDTH_POINTS, max_sparsity)
    return decoder_plan(module, example_inputs, config, data.tokens or [], WIDTH_POINTS, max_sparsity)


def _check_structure(config: object) -> None:
    """One CtkError unless ``config`` prunes what a target can set the widths of: the graph's
    coupled groups, or a causal LM's structures that strip removes (blocks and query heads leave
    the module before capture)."""
    if not (isinstance(config, Channels) or isinstance(config, DecoderStructures)
            and config.structure in DECODER_WIDTHS):
        raise CtkError(f"--target-speedup sets the widths of channel groups, heads and neurons of the graph, or of a "
                       f"causal LM's {', '.join(DECODER_WIDTHS)}; not for {_described(config)}")


def _check_target(target: Target, runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise CtkError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if isinstance(target, LatencyBudget):
        if not target.ms > 0:
            raise CtkError(f"--target-latency-ms must be above 0, got {target.ms}")
    elif not target > 1:
        raise CtkError(f"--target-speedup must be above 1 (a speedup over the dense model), got {target}")


def _speedup(target: Target, dense_file: str, inputs: Inputs, runtime: str) -> float:
    return target.speedup(dense_file, inputs, runtime) if isinstance(target, LatencyBudget) else target


def _flag(asked: Target, speedup: float) -> str:
    """The option as the user gave it, for a message."""
    if isinstance(asked, LatencyBudget):
        return f"--target-latency-ms {asked.ms:g} ({speedup:.2f}x)"
    return f"--target-speedup {speedup:g}"


def _described(config: object) -> str:
    structure = getattr(config, "structure", None)
    return f"{type(config).__name__} pruning" + (f" of {structure}" if structure else "")


def _next_budget(dense_ms: float, probes: list[WidthProbe], target: float) -> float:
    """The predicted latency expected to measure ``AIM * target``: the measured relative latency
    (1 / speedup) is taken as linear in the predicted one, through the dense model (1 at
    ``dense_ms``) and the probes, and read between the two points nearest the goal."""
    points = sorted({(dense_ms, 1.0), *((p.predicted_ms, 1 / p.speedup) for p in probes)})
    goal = 1 / (AIM * target)
    below = [p for p in points if p[1] <= goal]
    above = [p for p in points if p[1] > goal]
    if below and above:
        (x0, y0), (x1, y1) = max(below), min(above)
    else:  # every probe on one side: extrapolate from the two nearest the goal
        (x0, y0), (x1, y1) = sorted(points, key=lambda p: abs(p[1] - goal))[:2]
    if y1 == y0 or x1 == x0:
        return x0 * goal / y0
    return x0 + (goal - y0) * (x1 - x0) / (y1 - y0)


def _untimed(chooser: WidthChooser, budget: float, dense_ms: float, probes: list[tuple[Choice, WidthProbe]],
             target: float) -> tuple[Choice, float] | None:
    """The knapsack's widths for ``budget`` and that budget; where those widths were timed already,
    the budget walks toward the band in steps of :data:`WALK` of the dense model's predicted
    latency (up while the timed widths ran faster than the band, down while slower) to the first
    widths not yet timed. Without it, widths that measured just past the band's edge ended the
    search though wider ones lay between them and the target (digits-resnet at 1.5x: 1.66x).
    Where the walk turns back (the knapsack offers nothing between), one group moves one width
    (:func:`_neighbour`); None where nothing untimed is left."""
    timed = {choice.widths: p.speedup for choice, p in probes}
    direction, last = 0, None
    while 0 < budget < dense_ms:
        choice = chooser.choose(budget)
        if choice.widths not in timed:
            return choice, budget
        speedup = timed[choice.widths]
        wanted = 1 if speedup > (1 + TOLERANCE - MARGIN) * target else -1 if speedup < (1 + MARGIN) * target else 0
        if wanted == 0:
            return None
        if wanted == -direction:
            break
        direction, last = wanted, choice
        budget += direction * WALK * dense_ms
    neighbour = _neighbour(chooser, last, direction, timed) if last is not None else None
    return (neighbour, neighbour.predicted_ms) if neighbour is not None else None


def _neighbour(chooser: WidthChooser, here: Choice, direction: int,
               timed: Collection[tuple[int, ...]]) -> Choice | None:
    """``here`` with one group one candidate wider (``direction`` 1) or narrower (-1), not yet
    timed: the move that changes the predicted latency least, then the one that keeps the most
    importance. The table's cells of a model as small as digits-resnet are whole microseconds
    (ONNX Runtime's profiler), so the knapsack sees no step between widths that measured 1.95x
    and 2.19x; a single group's step is the smallest change there is."""
    picks = [option.widths.index(w) for option, w in zip(chooser.options, here.widths, strict=True)]
    moves = []
    for g, option in enumerate(chooser.options):
        j = picks[g] + direction
        if 0 <= j < len(option.widths):
            moved = chooser.choice([*picks[:g], j, *picks[g + 1:]])
            if moved.widths not in timed:
                moves.append(moved)
    if not moves:
        return None
    return min(moves, key=lambda c: (abs(c.predicted_ms - here.predicted_ms), -c.importance))


def _in_band(speedup: float, target: float) -> bool:
    """Whether a probe's measured speedup is in the band less a :data:`MARGIN` at each edge."""
    return (1 + MARGIN) * target <= speedup <= (1 + TOLERANCE - MARGIN) * target


def _kept(probes: list[tuple[Choice, WidthProbe]], target: float) -> tuple[Choice, WidthProbe]:
    """Of the probes within the band less its :data:`MARGIN`, the one that keeps most importance;
    where none is, of those that met the target, the one measured nearest the band's middle (the
    most importance would be the one nearest the target, the likeliest to measure below it again)."""
    met = [(choice, p) for choice, p in probes if p.speedup >= target]
    safe = [(choice, p) for choice, p in met if _in_band(p.speedup, target)]
    if safe:
        return max(safe, key=lambda item: item[0].importance)
    return min(met, key=lambda item: abs(item[1].speedup / target - AIM))


def _width_choice(plan: WidthPlan, target: float, runtime: str, precision: str, dense: Choice,
                  probes: list[tuple[Choice, WidthProbe]], table: LatencyTable, timed: Inputs) -> WidthChoice:
    """The :class:`WidthChoice` of the probe :func:`_kept` keeps."""
    choice, best = _kept(probes, target)
    sizes = sum(o.size for o in plan.options)
    return WidthChoice(target, runtime, precision, round(1 - sum(choice.widths) / sizes, 4), best.speedup,
                       choice.predicted_ms, dense.predicted_ms, best.speedup <= (1 + TOLERANCE) * target,
                       plan.described(choice.widths), [p for _, p in probes],
                       {"path": str(table.path), "measured": table.measured}, [list(t.shape) for t in timed],
                       plan.config(choice.widths))
