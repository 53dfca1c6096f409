"""``ctk``: the command line, a thin layer over the Python API.

User mistakes (:class:`CtkError`) print one line and exit with status 1; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rich.console import Console

from .errors import CtkError, Terminated
from .export_job import ExportJob
from .models.registry import DEFAULT_SPEC
from .options import add_options, from_args
from .prune_job import PruneJob
from .train_job import add_train_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ctk`, `compile-toolkit` and `python -m compile_toolkit`; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command"):
        parser.print_help()
        return 2
    try:
        # Commands that stage an output folder clean up on SIGTERM. Training keeps the default
        # (die at once): its checkpoints are atomic, and a rank blocked in a collective would not
        # run a Python handler until the collective times out, stalling torchrun's restarts.
        with _sigterm_as_interrupt() if args.command in (_export, _prune) else contextlib.nullcontext():
            return args.command(args)
    except CtkError as error:
        print(f"ctk: error: {error}", file=sys.stderr)
        return 1
    except Terminated:
        print("ctk: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("ctk: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while a command runs, so that it cleans up as Ctrl-C
    does (staging folders removed, workers ended) instead of dying with its files half-written.
    Only the main thread can set handlers; elsewhere (a caller's thread) SIGTERM keeps its default."""
    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctk", description="Prune, strip and export PyTorch models.")
    commands = parser.add_subparsers(title="commands")
    _job_command(commands, "export", ExportJob, _export,
                 help="strip a model (optionally prune it first) and export it, verified",
                 description="Load a model, optionally prune and fine-tune it, strip its dead channels exactly, "
                 "export it in every format verified in its runtime, and write report.json and report.md.")

    strip = commands.add_parser(
        "strip",
        help="show which channels strip removes and what keeps the others; strip an ONNX file",
        description="Capture a model, strip its zero and dead channels (verified) and print, per coupled "
        "channel group, how many channels stay; --explain names the op and node that kept each group. "
        "Given an .onnx file (made by any exporter), strip it and write the smaller file to --out, verified in "
        "ONNX Runtime against the input, which is never modified; its report goes beside it as OUT.report.json.",
    )
    strip.add_argument("onnx", nargs="?", help="an ONNX file to strip instead of --model")
    add_options(strip, ExportJob, only=("model", "weights", "input_shape"))
    strip.add_argument("--out", help="where the stripped ONNX file goes (default: beside the input, NAME.stripped.onnx)")
    strip.add_argument("--explain", action="store_true", help="list every kept group with the op and node that kept it")
    strip.add_argument("--no-latency", action="store_true", help="with an .onnx file: skip timing the input and the "
                       "output in ONNX Runtime (the report then has parameters, FLOPs and file size only)")
    strip.set_defaults(command=_strip)
    add_train_parser(commands)

    _job_command(commands, "prune", PruneJob, _prune,
                 help="prune a model as a YAML recipe says; write pruned weights and masks",
                 description="Prune a model by a recipe (method, targets, schedule, ignores, per-layer overrides; "
                 "see docs/pruning.md), write pruned.safetensors and masks.safetensors, and print the sparsity of "
                 "every layer.")
    return parser


def _job_command(commands: argparse._SubParsersAction, name: str, job: type, run: Callable[[argparse.Namespace], int],
                 **texts: str) -> None:
    """A command whose options are the fields of ``job`` (declared once, there)."""
    command = commands.add_parser(name, **texts)
    add_options(command, job)
    command.set_defaults(command=run)


def _export(args: argparse.Namespace) -> int:
    from . import export_job
    from .report import console_tables

    job = from_args(export_job.ExportJob, args)
    console = Console(stderr=True)
    report = export_job.run(job, step=_progress(console))
    out = Console()
    for table in console_tables(report):
        out.print(table)
    for note in report["notes"]:
        out.print(f"note: {note}", soft_wrap=True)
    out.print(f"report: {report['out']}/report.json, {report['out']}/report.md")
    return 0


def _prune(args: argparse.Namespace) -> int:
    """``ctk prune``: run the job, then print the sparsity of every layer as a table."""
    from rich.table import Table

    from .prune_job import run

    summary = run(from_args(PruneJob, args))
    table = Table(title=f"{summary['model']}: sparsity per layer")
    table.add_column("parameter")
    table.add_column("sparsity", justify="right")
    for name, sparsity in summary["layer_sparsity"].items():
        table.add_row(name, f"{sparsity:.1%}")
    table.add_row("[bold]all matrices and kernels[/bold]", f"[bold]{summary['sparsity']:.1%}[/bold]")
    console = Console()
    console.print(table)
    for note in summary["notes"]:
        console.print(f"note: {note}", soft_wrap=True)
    console.print(f"weights: {summary['weights']}\nmasks: {summary['masks']}", soft_wrap=True)
    return 0


def _strip(args: argparse.Namespace) -> int:
    if args.onnx is not None:
        return _strip_onnx(args)
    if args.out is not None:
        raise CtkError("--out is where a stripped ONNX file goes: give the .onnx file to strip")
    from .metrics import count_params
    from .models import load_model
    from .strip import strip, strip_summary

    loaded = load_model(args.model, args.weights, args.input_shape)
    for note in loaded.notes:
        Console(stderr=True).print(f"note: {note}", soft_wrap=True)
    stripped = strip(loaded.module, loaded.example_inputs)
    summary = strip_summary(stripped)
    _print_strip(loaded.name, summary, count_params(loaded.module), count_params(stripped), args.explain)
    return 0


def _strip_onnx(args: argparse.Namespace) -> int:
    """``ctk strip model.onnx``: the same analysis on a file made elsewhere, verified in ONNX Runtime."""
    from pathlib import Path

    from .onnx_strip import strip_onnx
    from .onnx_strip.report import write_reports

    given = [name for name, value in (("--model", args.model != DEFAULT_SPEC), ("--weights", args.weights),
                                      ("--input-shape", args.input_shape)) if value]
    if given:
        raise CtkError(f"{given[0]} is for a PyTorch model; an ONNX file carries its own weights and input shapes")
    source = Path(args.onnx)
    out = Path(args.out) if args.out is not None else source.with_name(source.stem + ".stripped.onnx")
    summary = strip_onnx(source, out, latency=not args.no_latency)
    json_path, md_path = write_reports(summary, source, out)
    _print_strip(str(source), summary, summary.parameters_before, summary.parameters_after, args.explain)
    Console().print(f"wrote {out} ({summary.file_bytes_before:,} -> {summary.file_bytes_after:,} bytes), "
                    f"{json_path.name} and {md_path.name}", soft_wrap=True)
    return 0


def _print_strip(name: str, summary: Any, before: int, after: int, explain: bool) -> None:
    """The strip's one-line summary and its table of groups (every group with --explain)."""
    from rich.table import Table

    table = Table()
    for column in ("group (first carrier)", "channels", "kept", "kept because"):
        table.add_column(column)
    for group in summary.groups:
        if explain or group.kept < group.channels:
            reason = group.kept_because or ("(in use: not zero or dead)" if group.kept else "")
            table.add_row(group.carriers[0], str(group.channels), str(group.kept), reason)
    console = Console()
    console.print(
        f"{name}: {summary.channels_removed} channels removed (counting each coupled channel once), "
        f"parameters {before:,} -> {after:,} ({before / max(after, 1):.2f}x fewer), "
        f"max relative error {summary.max_relative_error:.1e}",
        soft_wrap=True,
    )
    console.print(table)
    if explain:
        console.print("barriers: " + ("; ".join(summary.barriers) or "none"))


def _progress(console: Console):
    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        started = time.perf_counter()
        with console.status(f"{name} ..."):
            yield
        console.print(f"[green]done[/green] {name} [dim]({time.perf_counter() - started:.1f} s)[/dim]")

    return step
