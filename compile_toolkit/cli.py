"""``ctk``: the command line, a thin layer over the Python API.

User mistakes (:class:`CtkError`) print one line and exit with status 1; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console

from .errors import CtkError, Terminated
from .export_job import IMAGE_LR, TEXT_LR
from .exporters import ALL_FORMATS, FORMATS
from .tasks import TASKS
from .train_job import add_train_parser
from .training.config import MAX_BATCH, MAX_EPOCHS
from .workload import DEFAULT_SEQ_LEN


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
    export = commands.add_parser(
        "export",
        help="strip a model (optionally prune it first) and export it, verified",
        description="Load a model, optionally prune and fine-tune it, strip its dead channels exactly, "
        "export it in every format verified in its runtime, and write report.json and report.md.",
    )
    export.add_argument("--pruned", action="store_true", help="prune (channels by default; see --structure, "
                        "--method) and fine-tune before stripping")
    _model_options(export)
    export.add_argument("--sparsity", type=float, default=0.5, help="fraction of channels to prune per group (default 0.5)")
    _pruning_options(export)
    export.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(ALL_FORMATS)} "
                        f"(default {','.join(FORMATS)}; hf: a transformers folder of a causal LM with uniform widths)")
    export.add_argument("--out", help="output folder (default ctk-out/<model>)")
    _force_option(export)
    export.add_argument("--no-finetune", action="store_true",
                        help="skip fine-tuning after pruning (batch-norm statistics are still re-estimated)")
    export.add_argument("--finetune-epochs", type=int, default=5,
                        help=f"fine-tuning epochs, 0 to {MAX_EPOCHS} (default 5)")
    export.add_argument("--data", help="what to fine-tune on and measure with: 'digits' (the default, the built-in "
                        "model's data), an image folder (train/<class>/*.png|jpg, val/<class>/...), text (a .txt, "
                        ".jsonl, .csv or .parquet file or folder, tokenized by the hf: model's tokenizer) or "
                        "path/to/file.py:factory returning (train_dataset, val_dataset)")
    export.add_argument("--task", choices=TASKS, help="what the model does with the data, and the metric reported "
                        "(top-1, perplexity, cosine to the dense model); default: what an hf: folder was saved for, "
                        "else classify")
    export.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                        help=f"tokens per text sample: causal-lm blocks, classify/embed rows padded or cut "
                        f"(default {DEFAULT_SEQ_LEN})")
    export.add_argument("--text-column", default="text", help="column of .jsonl/.csv/.parquet text (default text)")
    export.add_argument("--label-column", default="label", help="column of the classification labels (default label)")
    export.add_argument("--lr", type=float, help=f"fine-tuning learning rate (Adam; default {IMAGE_LR:g}, "
                        f"{TEXT_LR:g} for text)")
    export.add_argument("--no-distill", action="store_true",
                        help="fine-tune on the labels alone (default: also distil from the dense model)")
    export.add_argument("--batch-size", type=int, default=64,
                        help=f"fine-tuning and evaluation batch, 1 to {MAX_BATCH} (default 64)")
    export.add_argument("--sparse-onnx", action="store_true",
                        help="also write model.sparse.onnx, mostly-zero weights stored as sparse initializers "
                        "(a smaller file after unstructured pruning; ONNX Runtime densifies them at load)")
    export.add_argument("--checkpoint", help="a `ctk train` checkpoint folder: its weights and masks replace pruning here")
    export.add_argument("--quantize", choices=("int8",),
                        help="also write model.int8.onnx (ONNX Runtime static QDQ int8, calibrated on the training "
                        "split) and model.int8.pt2 (PT2E), and report test accuracy, size and latency against float")
    export.add_argument("--calibration-method", default="minmax", choices=("minmax", "entropy", "percentile"),
                        help="how activation ranges are chosen from the calibration batches (default minmax)")
    export.add_argument("--max-metric-drop", type=float, default=1.0,
                        help="points of test accuracy int8 may lose before layers are kept in float, then the job "
                        "fails (default 1.0)")
    export.add_argument("--recipe", help="a YAML recipe whose quantize: section sets the int8 options "
                        "(docs/quantization.md); its pruning is `ctk prune --recipe`'s, pass that as --weights")
    export.set_defaults(command=_export)

    strip = commands.add_parser(
        "strip",
        help="show which channels strip removes and what keeps the others; strip an ONNX file",
        description="Capture a model, strip its zero and dead channels (verified) and print, per coupled "
        "channel group, how many channels stay; --explain names the op and node that kept each group. "
        "Given an .onnx file (made by any exporter), strip it and write the smaller file to --out, verified in "
        "ONNX Runtime against the input, which is never modified; its report goes beside it as OUT.report.json.",
    )
    strip.add_argument("onnx", nargs="?", help="an ONNX file to strip instead of --model")
    _model_options(strip)
    strip.add_argument("--out", help="where the stripped ONNX file goes (default: beside the input, NAME.stripped.onnx)")
    strip.add_argument("--explain", action="store_true", help="list every kept group with the op and node that kept it")
    strip.set_defaults(command=_strip)
    add_train_parser(commands)

    prune = commands.add_parser(
        "prune",
        help="prune a model as a YAML recipe says; write pruned weights and masks",
        description="Prune a model by a recipe (method, targets, schedule, ignores, per-layer overrides; see "
        "docs/pruning.md), write pruned.safetensors and masks.safetensors, and print the sparsity of every layer.",
    )
    _model_options(prune)
    prune.add_argument("--recipe", help="the YAML recipe (or prune once with --structure/--method and --sparsity)")
    prune.add_argument("--sparsity", type=float, default=0.5, help="fraction to prune without a recipe (default 0.5)")
    _pruning_options(prune)
    prune.add_argument("--data", help="calibration text for language models: pydoc (the built-in set; the default for "
                       "GGUF decoders) or a text file/folder tokenized by the model's tokenizer")
    prune.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                       help=f"tokens per calibration sequence (default {DEFAULT_SEQ_LEN})")
    prune.add_argument("--out", help="output folder (default ctk-out/<model>-pruned)")
    _force_option(prune)
    prune.set_defaults(command=_prune)
    return parser


def _pruning_options(parser: argparse.ArgumentParser) -> None:
    """What to prune and how: shared by ``export --pruned`` and ``prune`` (compile_toolkit/pruning/llm/plan.py)."""
    from .pruning.llm.plan import ACTIVATION, INFLUENCE, STRUCTURES

    parser.add_argument("--structure", choices=STRUCTURES,
                        help="channel (default: coupled channel groups), head (attention heads and MLP neurons), "
                        "attention_head, query_head, neuron or block (whole decoder blocks); on a causal LM "
                        "attention heads are whole key/value groups with their query heads, query_head the same "
                        "number of query heads in every group, so the model stays grouped-query")
    parser.add_argument("--importance", help=f"how structures are scored: {ACTIVATION} (a causal LM's default: "
                        f"mean |activation| on calibration text), {INFLUENCE} (blocks), or a weight criterion such "
                        "as l1 (the default elsewhere), l2, random")
    parser.add_argument("--method", help="prune single weights of a causal LM's decoder layers: magnitude, wanda "
                        "or sparsegpt (unstructured at --sparsity, or N:M with --pattern)")
    parser.add_argument("--pattern", help="N:M sparsity with --method, e.g. 2:4 or 4:8 (N kept of every M inputs)")
    parser.add_argument("--calibration-samples", type=int,
                        help="sequences of text calibrating wanda, sparsegpt and activation importance "
                        "(default 128, or all the data has if fewer)")
    parser.add_argument("--per-layer", action="store_true",
                        help="let each decoder layer keep its own width (ranked across layers); the hf format "
                        "then cannot be written")


def _force_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="replace --out even if it holds files this toolkit did not write (they are deleted; the "
                        "error without --force names them); never /, the home folder, a mount point, the current "
                        "folder or a folder holding the job's inputs")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="digits-resnet", help="digits-resnet (default), torchvision:<name>, "
                        "timm:<name>, hf:<folder> (a local Hugging Face folder) or path/to/file.py:factory")
    parser.add_argument("--weights", help="the model's state dict: .safetensors, or .pt/.pth read with torch.load(weights_only=True)")
    parser.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")


def _export(args: argparse.Namespace) -> int:
    from . import export_job
    from .report import console_tables

    job = export_job.ExportJob(
        model=args.model,
        weights=args.weights,
        input_shape=args.input_shape,
        pruned=args.pruned,
        sparsity=args.sparsity,
        structure=args.structure,
        importance=args.importance,
        method=args.method,
        pattern=args.pattern,
        calibration_samples=args.calibration_samples,
        per_layer=args.per_layer,
        formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
        out=args.out,
        finetune=not args.no_finetune,
        finetune_epochs=args.finetune_epochs,
        checkpoint=args.checkpoint,
        sparse_onnx=args.sparse_onnx,
        force=args.force,
        data=args.data,
        task=args.task,
        seq_len=args.seq_len,
        text_column=args.text_column,
        label_column=args.label_column,
        lr=args.lr,
        distill=not args.no_distill,
        batch_size=args.batch_size,
        quantize=args.quantize,
        calibration_method=args.calibration_method,
        max_metric_drop=args.max_metric_drop,
        recipe=args.recipe,
    )
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

    from .prune_job import PruneJob, run
    from .pruning.llm.plan import PruneOptions

    given = [args.structure, args.method, args.importance, args.pattern, args.calibration_samples, args.per_layer]
    options = (PruneOptions(args.sparsity, args.structure, args.importance, args.method, args.pattern,
                            args.calibration_samples, args.per_layer) if any(given) else None)
    summary = run(
        PruneJob(recipe=args.recipe, model=args.model, weights=args.weights, input_shape=args.input_shape, out=args.out,
                 force=args.force, options=options, data=args.data, seq_len=args.seq_len)
    )
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

    from .fileio import write_atomic
    from .onnx_strip import strip_onnx

    given = [name for name, value in (("--model", args.model != "digits-resnet"), ("--weights", args.weights),
                                      ("--input-shape", args.input_shape)) if value]
    if given:
        raise CtkError(f"{given[0]} is for a PyTorch model; an ONNX file carries its own weights and input shapes")
    source = Path(args.onnx)
    out = Path(args.out) if args.out is not None else source.with_name(source.stem + ".stripped.onnx")
    summary = strip_onnx(source, out)
    write_atomic(out.with_name(out.name + ".report.json"),
                 (json.dumps({"source": str(source), "out": str(out), **summary.to_dict()}, indent=2) + "\n").encode())
    _print_strip(str(source), summary, summary.parameters_before, summary.parameters_after, args.explain)
    Console().print(f"wrote {out} ({summary.file_bytes_before:,} -> {summary.file_bytes_after:,} bytes) "
                    f"and {out.name}.report.json", soft_wrap=True)
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
