"""``ctk``: the command line, a thin layer over the Python API.

User mistakes (:class:`CtkError`) print one line and exit with status 1; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator, Sequence

from rich.console import Console

from .errors import CtkError
from .exporters import FORMATS


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ctk`, `compile-toolkit` and `python -m compile_toolkit`; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command"):
        parser.print_help()
        return 2
    try:
        return args.command(args)
    except CtkError as error:
        print(f"ctk: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ctk: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctk", description="Prune, strip and export PyTorch models.")
    commands = parser.add_subparsers(title="commands")
    export = commands.add_parser(
        "export",
        help="strip a model (optionally prune it first) and export it, verified",
        description="Load a model, optionally prune and fine-tune it, strip its dead channels exactly, "
        "export it in every format verified in its runtime, and write report.json and report.md.",
    )
    export.add_argument("--pruned", action="store_true", help="prune channels structurally (and fine-tune) before stripping")
    export.add_argument("--model", default="digits-resnet", help="digits-resnet (default), torchvision:<name> or path/to/file.py:factory")
    export.add_argument("--weights", help="a .safetensors state dict for the model")
    export.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    export.add_argument("--sparsity", type=float, default=0.5, help="fraction of channels to prune per group (default 0.5)")
    export.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)}")
    export.add_argument("--out", help="output folder (default ctk-out/<model>)")
    export.add_argument("--no-finetune", action="store_true", help="skip fine-tuning after pruning")
    export.add_argument("--finetune-epochs", type=int, default=5, help="fine-tuning epochs (default 5)")
    export.set_defaults(command=_export)
    return parser


def _export(args: argparse.Namespace) -> int:
    from . import export_job
    from .report import console_tables

    job = export_job.ExportJob(
        model=args.model,
        weights=args.weights,
        input_shape=args.input_shape,
        pruned=args.pruned,
        sparsity=args.sparsity,
        formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
        out=args.out,
        finetune=not args.no_finetune,
        finetune_epochs=args.finetune_epochs,
    )
    console = Console(stderr=True)
    report = export_job.run(job, step=_progress(console))
    out = Console()
    for table in console_tables(report):
        out.print(table)
    out.print(f"report: {report['out']}/report.json, {report['out']}/report.md")
    return 0


def _progress(console: Console):
    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        started = time.perf_counter()
        with console.status(f"{name} ..."):
            yield
        console.print(f"[green]done[/green] {name} [dim]({time.perf_counter() - started:.1f} s)[/dim]")

    return step
