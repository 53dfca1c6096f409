#!/usr/bin/env python3
"""``ctk.strip_onnx`` against onnxsim 0.8.1's structured pruning, on ONNX files with zeroed channels.

Each file is made here: a torchvision classifier (random weights, BatchNorm statistics drawn as
training leaves them: :func:`trained_batch_norms`) with ``--sparsity`` of its coupled channel groups
zeroed by ``ctk.prune`` (L1), exported with ``torch.onnx.export`` (the TorchScript exporter, BN
folded into the convolutions, dynamic batch). Then:

- this strip: ``ctk.strip_onnx`` on the file (verified in ONNX Runtime against it);
- onnxsim: ``onnxsim.simplify`` then ``onnxsim.pruning.apply_structured_pruning`` at the same
  sparsity (it picks channels by L2 norm itself; the zeroed ones have norm 0), checked against the
  file here on the same sample inputs;
- ``ctk.strip`` on the PyTorch model, for its parameter count (the ONNX strip should match it), and
  the ``model.onnx`` that ``ctk export`` writes from it, timed beside the others (the ONNX strip
  should be at least as fast).

Parameters are initializer elements (the PyTorch count: module parameters). Latency is ONNX
Runtime's CPU latency at batch 1, all four files timed in one process by
``metrics.compare_latency_many`` (blocks of runs after an untimed run, order rotated and reversed every round,
median of per-round ratios against the original file), so the ratios are comparable on a noisy
machine; the milliseconds are not.

    .venv/bin/python tools/bench_onnx_strip.py [--models resnet50,resnet18] [--rounds 20]
        [--size 224] [--sparsity 0.5] [--json results.json] [--quick]

``--quick``: ResNet-18 at 64 x 64, 2 rounds of 3 runs: a smoke run (well under a minute), whose
parameter columns are exact but whose latency ratios are only indicative.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.errors import summary
from compile_toolkit.metrics import compare_latency_many, count_params, default_threads
from compile_toolkit.onnx_strip.strip import parameter_count
from compile_toolkit.onnx_strip.verify import reference_outputs, run, sample_feeds
from compile_toolkit.passes.verify import relative_error

MODELS = ("resnet50", "resnet18")
ONNXSIM_VERSION = "0.8.1"


@dataclass(frozen=True)
class Settings:
    """What every file in one run is measured with."""

    size: int  # image height and width
    fresh_batch_norms: bool  # keep torchvision's fresh BN statistics (see trained_batch_norms)
    sparsity: float  # of coupled channel groups zeroed by ctk.prune, and onnxsim's target
    rounds: int
    iters: int  # timed runs per block
    warmup: int  # runs of each file before the rounds


def make_file(name: str, settings: Settings, path: Path) -> tuple[nn.Module, torch.Tensor]:
    """The pruned model, its batch-1 input, and its ONNX file at ``path``."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    if not settings.fresh_batch_norms:
        trained_batch_norms(model)
    x = torch.randn(1, 3, settings.size, settings.size)
    ctk.prune(model, (x,), settings.sparsity, "channel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return model, x


def trained_batch_norms(model: nn.Module) -> None:
    """Give every BatchNorm statistics and an affine transform as training leaves them (seeded
    draws). Why: with torchvision's fresh ones (mean 0, variance 1, scale 1, shift 0) every bias
    folded into a convolution is zero, the TorchScript exporter then stores one zero tensor per
    width and shares it between all convolutions of that width, and onnxsim 0.8.1 slices that
    shared bias for one convolution and breaks the others (ONNX Runtime refuses the file: "bias
    must be a 1D tensor of size output_channels"). Trained files have distinct biases."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)


def onnxsim_prune(source: Path, sparsity: float, path: Path) -> float:
    """onnxsim's pipeline on ``source``, written to ``path``; returns the seconds it took."""
    import onnxsim
    from onnxsim import pruning

    started = time.perf_counter()
    simplified, _ = onnxsim.simplify(onnx.load(str(source)))
    onnx.save(pruning.apply_structured_pruning(simplified, sparsity), str(path))
    return time.perf_counter() - started


def max_relative_errors(source: Path, candidates: dict[str, Path]) -> dict[str, float | str]:
    """Each candidate's largest output error against ``source`` in ONNX Runtime, relative to the
    largest output, on the strip's seeded sample inputs (the same for every candidate); where
    ONNX Runtime cannot run a candidate, the one-line reason instead (it is then not timed)."""
    feeds = sample_feeds(ir.load(str(source)))
    expected = reference_outputs(str(source), feeds)
    errors: dict[str, float | str] = {}
    for key, path in candidates.items():
        try:
            errors[key] = relative_error(expected, run(str(path), feeds))
        except Exception as error:  # noqa: BLE001 - a file the runtime refuses is a result to report
            errors[key] = f"fails in ONNX Runtime: {summary(error)}"
    return errors


def bench(name: str, settings: Settings, folder: Path) -> dict[str, Any]:
    """One row: parameters, verification errors and batch-1 latency ratios of the three files."""
    paths = {key: folder / f"{name}.{key}.onnx" for key in ("original", "ctk", "onnxsim")}
    model, x = make_file(name, settings, paths["original"])
    started = time.perf_counter()
    stripped = ctk.strip_onnx(paths["original"], paths["ctk"], latency=False)
    ctk_seconds = time.perf_counter() - started
    onnxsim_seconds = onnxsim_prune(paths["original"], settings.sparsity, paths["onnxsim"])
    stripped_module = ctk.strip(model, (x,))
    pytorch_params = count_params(stripped_module)
    # what `ctk export` writes for the same pruned model: the PyTorch path's file, timed beside them
    ctk.export(stripped_module, (x,), str(folder / f"{name}.export"), formats=("onnx",), reference=model)
    paths["ctk_export"] = folder / f"{name}.export" / "model.onnx"
    errors = max_relative_errors(paths["original"], {key: paths[key] for key in ("ctk", "onnxsim", "ctk_export")})
    runnable = {key: str(path) for key, path in paths.items() if not isinstance(errors.get(key, 0.0), str)}
    latency = compare_latency_many(runnable, (x,), rounds=settings.rounds, warmup=settings.warmup,
                                   iters=settings.iters)
    params = {key: parameter_count(ir.load(str(path))) for key, path in paths.items()}
    assert params["ctk"] == stripped.parameters_after, "the summary counts the file it wrote"
    return {"model": name, "params": {**params, "ctk_strip_pytorch": pytorch_params}, "max_relative_error": errors,
            "latency_ms": {key: value["ms"] for key, value in latency.items()},
            "speedup": {key: value["speedup"] for key, value in latency.items() if key != "original"},
            "seconds": {"ctk": ctk_seconds, "onnxsim": onnxsim_seconds}}


def table(rows: list[dict[str, Any]], settings: Settings) -> Table:
    """The side-by-side table: parameters and batch-1 latency ratios per tool."""
    result = Table(title=f"ONNX strip vs onnxsim {ONNXSIM_VERSION} structured pruning, {settings.sparsity:.0%} of channel "
                         f"groups zeroed, ORT CPU batch 1 at {settings.size}x{settings.size}, {default_threads()} threads, "
                         f"{settings.rounds} rounds")
    columns = ("model", "params original", "params ctk.strip_onnx", "params onnxsim", "params ctk.strip (PyTorch)",
               "ORT original ms", "ctk.strip_onnx speedup", "onnxsim speedup", "ctk export speedup",
               "max rel. error ctk / onnxsim")
    for column in columns:
        result.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        p, s, e = r["params"], r["speedup"], r["max_relative_error"]
        result.add_row(r["model"], f"{p['original']:,}", f"{p['ctk']:,}", f"{p['onnxsim']:,}",
                       f"{p['ctk_strip_pytorch']:,}", f"{r['latency_ms']['original']:.2f}", _speedup(s, "ctk"),
                       _speedup(s, "onnxsim"), _speedup(s, "ctk_export"), f"{_error(e['ctk'])} / {_error(e['onnxsim'])}")
    return result


def _speedup(speedups: dict[str, float], key: str) -> str:
    return f"{speedups[key]:.2f}x" if key in speedups else "-"


def _error(error: float | str) -> str:
    return "fails in ORT" if isinstance(error, str) else f"{error:.1e}"


def parse_args() -> tuple[list[str], Settings, str | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision classifiers")
    parser.add_argument("--rounds", type=int, default=20, help="latency rounds (blocks of each file per round)")
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of channel groups zeroed")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--quick", action="store_true", help="resnet18 at 64x64, 2 rounds: a smoke run")
    parser.add_argument("--fresh-batch-norms", action="store_true",
                        help="keep torchvision's fresh BN statistics (zero folded biases, shared by the exporter)")
    args = parser.parse_args()
    try:
        import onnxsim
    except ImportError:
        parser.error(f"onnxsim is not installed: .venv/bin/python -m pip install onnxsim=={ONNXSIM_VERSION}")
    if onnxsim.__version__.lstrip("v") != ONNXSIM_VERSION:
        parser.error(f"onnxsim {onnxsim.__version__} is installed; this benchmark is for onnxsim {ONNXSIM_VERSION}")
    if args.rounds < 1 or not 0 < args.sparsity < 1 or args.size < 32:
        parser.error("--rounds must be at least 1, --sparsity between 0 and 1, --size at least 32")
    import torchvision

    unknown = sorted(set(args.models.split(",")) - set(torchvision.models.list_models(module=torchvision.models)))
    if unknown:
        parser.error(f"--models: {', '.join(unknown)} is not a torchvision classifier (e.g. {', '.join(MODELS)})")
    if args.quick:
        return ["resnet18"], Settings(64, args.fresh_batch_norms, args.sparsity, 2, 3, 2), args.json
    settings = Settings(args.size, args.fresh_batch_norms, args.sparsity, args.rounds, 10, 10)
    return args.models.split(","), settings, args.json


def main() -> None:
    names, settings, json_path = parse_args()
    console = Console()
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp, console.status(f"{name} ..."):
            rows.append(bench(name, settings, Path(tmp)))
    console.print(table(rows, settings))
    if json_path:
        Path(json_path).write_text(json.dumps({"settings": settings.__dict__, "threads": default_threads(),
                                               "onnxsim": ONNXSIM_VERSION, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
