"""``ctk export --pruned --target-speedup X``: choose how much to prune by measuring, in the runtime
the model is deployed to and on this machine, instead of asking for a sparsity.

What a user wants is "2x faster where it runs", and FLOPs do not say what a runtime makes of a
width. So each candidate sparsity is a probe: a copy of the model pruned at that sparsity (every
coupled group alike, lowest importance first), stripped, exported and verified, then timed against
the dense model in the chosen runtime as the report's latency is (alternated rounds, median of
ratios). The probes bisect between no pruning and :data:`MAX_SPARSITY` for the smallest sparsity
that meets the target, which keeps the most channels; a target that even :data:`MAX_SPARSITY`
misses is one clear line before any fine-tuning. Widths here are uniform across groups: choosing
each group's width from a measured per-layer latency table is the next step (issue 23).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from .capture import Inputs
from .errors import CtkError
from .exporters import export
from .pruning.configs import Channels
from .pruning.prune_ import PruneData, prune_
from .strip import strip

MAX_SPARSITY = 0.9  # the most of every group a probe prunes
RESOLUTION = 0.05  # the bisection stops when the sparsity bracket is this narrow
Compare = Callable[..., dict[str, float]]  # metrics.compare_latency_ms or its OpenVINO twin


@dataclass
class Probe:
    sparsity: float
    speedup: float


@dataclass
class TargetChoice:
    """The sparsity chosen for ``target`` speedup in ``runtime``, the speedup its probe measured,
    and every probe in the order run."""

    target: float
    runtime: str
    sparsity: float
    probe_speedup: float
    probes: list[Probe] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_sparsity(module: nn.Module, example_inputs: Inputs, config: Channels, target: float, runtime: str,
                    artifact: tuple[str, Path], compare: Compare, calibration: list[Inputs] | None = None,
                    rounds: int = 12, budget_s: float = 10.0) -> TargetChoice:
    """The smallest sparsity of ``config`` (its own is ignored) whose stripped model runs ``target``
    times faster than ``module`` in ``runtime``: ``artifact`` is the export format timed and its
    file in the output folder (``("onnx", "model.onnx")``), ``compare`` the timing of two such files."""
    if not isinstance(config, Channels):
        raise CtkError(f"--target-speedup chooses widths of coupled channel groups, heads and neurons of the graph; "
                       f"not for {type(config).__name__} pruning")
    if not target > 1:
        raise CtkError(f"--target-speedup must be above 1 (a speedup over the dense model), got {target}")
    batch1 = tuple(t[:1] for t in example_inputs)
    with tempfile.TemporaryDirectory(prefix="ctk-target-") as folder:
        dense = _exported(copy.deepcopy(module), example_inputs, artifact, Path(folder) / "dense")
        choice = TargetChoice(target, runtime, MAX_SPARSITY, 0.0)

        def probe(sparsity: float) -> float:
            pruned = copy.deepcopy(module)
            prune_(pruned, replace(config, sparsity=sparsity), PruneData(example_inputs, calibration))
            path = _exported(strip(pruned, example_inputs), example_inputs, artifact,
                             Path(folder) / f"probe{len(choice.probes)}", reference=pruned)
            speedup = compare(str(dense), str(path), batch1, rounds=rounds, budget_s=budget_s)["ratio"]
            choice.probes.append(Probe(sparsity, speedup))
            return speedup

        choice.probe_speedup = probe(MAX_SPARSITY)
        if choice.probe_speedup < target:
            raise CtkError(f"--target-speedup {target:g} cannot be met in {runtime} on this machine: pruning "
                           f"{MAX_SPARSITY:.0%} of every channel group runs only {choice.probe_speedup:.2f}x faster "
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


def _exported(module: nn.Module, example_inputs: Inputs, artifact: tuple[str, Path], folder: Path,
              reference: nn.Module | None = None) -> Path:
    """The verified file of ``artifact``'s format for ``module`` under ``folder``."""
    fmt, file = artifact
    export(module, example_inputs, str(folder), formats=(fmt,), reference=reference)
    return folder / file
