"""The main job, ``ctk export --pruned``: load, prune, fine-tune, strip, export, measure, report."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from . import export_measure, export_prune, metrics, openvino_runtime, runtimes_report
from .errors import CtkError
from .export_prune import IMAGE_LR, TEXT_LR
from .exporters import ALL_FORMATS, FORMATS, export
from .exporters import hf as hf_format
from .job_options import force_option, input_shape_option, model_option, out_option, weights_option
from .models import LoadedModel
from .options import comma_list, option, options_of
from .outdir import check_out_option, default_out, job_inputs, staged_folder
from .pipeline import PipelineLog, recording
from .pruning.llm.plan import PruneOptions
from .pruning.prune_ import is_causal_lm
from .pruning.recipe import load_recipe
from .quantize import PT2E, OrtAuto, QuantizeConfig, qat
from .quantize import job as quantize_job
from .quantize.config import with_learned_ranges
from .report import ExportReport
from .strip import strip, strip_summary
from .tasks import TASKS
from .training.checkpoint import Checkpoint, load_checkpoint
from .training.config import MAX_BATCH, MAX_EPOCHS, check_count
from .workload import DEFAULT_SEQ_LEN, PositionalInputs, load_workload

Step = Callable[[str], AbstractContextManager]

# Dense files, of those formats among the written ones: sizes for comparison; ONNX (always written) or
# the OpenVINO IR for latency.
DENSE_FORMATS = ("torchscript", "pt2", "onnx", "openvino")


@dataclass
class ExportJob:
    """Options of ``ctk export``, each declared once with its flag (the parser is built from these
    fields); the defaults are the main job on the built-in model."""

    model: str = model_option()
    weights: str | None = weights_option()
    input_shape: str | None = input_shape_option()
    pruned: bool = option("--pruned", "prune (channels by default; see --structure, --method) and fine-tune before "
                          "stripping", False)
    prune: PruneOptions = options_of(PruneOptions)
    formats: tuple[str, ...] = option("--formats", f"comma-separated subset of {','.join(ALL_FORMATS)} (default "
                                      f"{','.join(FORMATS)}; hf: a transformers folder of a causal LM with uniform "
                                      "widths)", FORMATS, parse=comma_list)
    runtime: str = option("--runtime", "where report.json's dense-vs-stripped latency is measured: ort (ONNX Runtime, "
                          "model.onnx; the default) or openvino (OpenVINO's CPU runtime in fp32, openvino/model.xml; "
                          "needs openvino in --formats)", "ort", choices=tuple(metrics.RUNTIMES))
    target_speedup: float | None = option(
        "--target-speedup", "with --pruned: choose each group's width (channels, or by --structure neurons and "
        "attention heads; a causal LM's neurons or key/value groups per decoder layer, timed as prefill at "
        "--seq-len) so the stripped model runs this many times faster than the dense one in --runtime on this "
        "machine, keeping the most importance (a per-layer latency table measured and cached, then checked end to "
        "end), instead of --sparsity; a causal LM's --structure head chooses neurons and key/value groups together",
        parse=float)
    target_latency_ms: float | None = option(
        "--target-latency-ms", "with --pruned: as --target-speedup, for a batch-1 latency in ms in --runtime instead "
        "(the dense model is timed first; the target is its latency over this)", parse=float)
    out: str | None = out_option("ctk-out/<model>")
    finetune: bool = option("--no-finetune", "skip fine-tuning after pruning (batch-norm statistics are still "
                            "re-estimated)", True, negated=True)
    finetune_epochs: int = option("--finetune-epochs", f"fine-tuning epochs, 0 to {MAX_EPOCHS} (default 5)", 5,
                                  parse=int)
    checkpoint: str | None = option("--checkpoint", "a `ctk train` checkpoint folder: its weights and masks replace "
                                    "pruning here")
    sparse_onnx: bool = option("--sparse-onnx", "also write model.sparse.onnx, mostly-zero weights stored as sparse "
                               "initializers (a smaller file after unstructured pruning; ONNX Runtime densifies them "
                               "at load)", False)
    force: bool = force_option()
    data: str | None = option("--data", "what to fine-tune on and measure with: 'digits' (the default, the built-in "
                              "model's data), an image folder (train/<class>/*.png|jpg, val/<class>/...), text (a "
                              ".txt, .jsonl, .csv or .parquet file or folder, tokenized by the hf: model's tokenizer) "
                              "or path/to/file.py:factory returning (train_dataset, val_dataset)")
    task: str | None = option("--task", "what the model does with the data, and the metric reported (top-1, "
                              "perplexity, cosine to the dense model); default: what an hf: folder was saved for, "
                              "else classify", choices=TASKS)
    seq_len: int = option("--seq-len", f"tokens per text sample: causal-lm blocks, classify/embed rows padded or cut "
                          f"(default {DEFAULT_SEQ_LEN})", DEFAULT_SEQ_LEN, parse=int)
    text_column: str = option("--text-column", "column of .jsonl/.csv/.parquet text (default text)", "text")
    label_column: str = option("--label-column", "column of the classification labels (default label)", "label")
    lr: float | None = option("--lr", f"fine-tuning learning rate (Adam; default {IMAGE_LR:g}, {TEXT_LR:g} for "
                              "text)", parse=float)
    distill: bool = option("--no-distill", "fine-tune on the labels alone (default: also distil from the dense "
                           "model)", True, negated=True)
    batch_size: int = option("--batch-size", f"fine-tuning and evaluation batch, 1 to {MAX_BATCH} (default 64)", 64,
                             parse=int)
    latency_rounds: int = 60
    quantize: str | None = option("--quantize", "also write model.int8.onnx (ONNX Runtime static QDQ int8, "
                                  "calibrated on the training split) and model.int8.pt2 (PT2E), and report test "
                                  "accuracy, size and latency against float", choices=("int8",))
    calibration_method: str = option("--calibration-method", "how activation ranges are chosen from the calibration "
                                     "batches (default minmax)", "minmax", choices=("minmax", "entropy", "percentile"))
    max_metric_drop: float = option("--max-metric-drop", "points of test accuracy int8 may lose before layers are "
                                    "kept in float, then the job fails (default 1.0)", 1.0, parse=float)
    recipe: str | None = option("--recipe", "a YAML recipe whose quantize: section sets the int8 options "
                                "(docs/quantization.md); its pruning is `ctk prune --recipe`'s, pass that as --weights")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else default_out(self.model)

    @property
    def inputs(self) -> list[Path]:
        """The files and folders the job reads, which its output folder must neither hold nor lie in."""
        return job_inputs(self.model, self.weights, self.checkpoint, self.data, self.recipe)

    def validate(self) -> None:
        """Fail on bad options before any heavy work."""
        check_out_option(self.out)
        if not self.formats:
            raise CtkError(f"--formats is empty; give one or more of {', '.join(ALL_FORMATS)}")
        unknown = [f for f in self.formats if f not in ALL_FORMATS]
        if unknown:
            raise CtkError(f"unknown format {unknown[0]!r}; valid formats: {', '.join(ALL_FORMATS)}")
        timed = metrics.RUNTIMES[self.runtime].formats["fp32"]
        if timed not in self.formats and timed != "onnx":  # ONNX is always written
            raise CtkError(f"--runtime {self.runtime} times the {timed} artifact: add {timed} to --formats")
        if "openvino" in self.formats:
            openvino_runtime.require()
        self.prune.validate()
        self._validate_target()
        given = self.prune.given()
        if given and not self.pruned:
            raise CtkError(f"{given[0]} says how to prune: add --pruned")
        check_count("--batch-size", self.batch_size, 1, MAX_BATCH)
        check_count("--finetune-epochs", self.finetune_epochs, 0, MAX_EPOCHS)
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise CtkError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.seq_len < 2:
            raise CtkError(f"--seq-len must be at least 2 tokens, got {self.seq_len}")
        check_count("--seq-len", self.seq_len, 2, MAX_BATCH)
        if self.checkpoint is not None and self.weights is not None:
            raise CtkError("--checkpoint brings its own weights: drop --weights")
        self.quant_configs()

    def _validate_target(self) -> None:
        if self.target_speedup is not None and self.target_latency_ms is not None:
            raise CtkError("--target-speedup and --target-latency-ms both say how fast: give one")
        flag, value, low = (("--target-speedup", self.target_speedup, 1.0) if self.target_latency_ms is None
                            else ("--target-latency-ms", self.target_latency_ms, 0.0))
        if value is None:
            return
        if not self.pruned:
            raise CtkError(f"{flag} chooses how much to prune: add --pruned")
        if self.prune.sparsity != PruneOptions().sparsity:
            raise CtkError(f"{flag} chooses the sparsity: drop --sparsity")
        if not (math.isfinite(value) and value > low):
            raise CtkError(f"{flag} must be a finite number above {low:g}, got {value}")

    def quant_configs(self) -> tuple[QuantizeConfig, ...]:
        """The --quantize options (or the --recipe's quantize: section) as checked configs: ONNX
        Runtime's int8, and PT2E where pt2 is exported (none without either)."""
        if self.recipe is not None:
            configs = _recipe_quant_configs(self)
        elif self.quantize is not None:
            configs = (OrtAuto(calibration_method=self.calibration_method,
                               max_metric_drop=self.max_metric_drop).validate(), PT2E())
        else:
            return ()
        return tuple(c for c in configs if not isinstance(c, PT2E) or "pt2" in self.formats)


def run(job: ExportJob, step: Step | None = None) -> dict[str, Any]:
    """Run the job and return the report (also written as report.json and report.md)."""
    job.validate()
    with recording() as log, staged_folder(job.out_dir, force=job.force, inputs=job.inputs) as staging:
        trained = _read_checkpoint(job) if job.checkpoint is not None else None
        timed = _timer(log, step)
        with timed("load model"):
            loaded, work = load_workload(job.model, job.data, job.weights, job.input_shape, job.batch_size, job.task,
                                         seq_len=job.seq_len, text_column=job.text_column,
                                         label_column=job.label_column)
        if "hf" in job.formats and not is_causal_lm(loaded.module):
            raise CtkError(f"--formats hf writes a transformers causal LM folder; --model {job.model} is not one "
                           "(smollm2-135m, a GGUF decoder or an hf: causal LM)")
        dense = copy.deepcopy(loaded.module).eval()
        quant_configs = job.quant_configs()
        if quant_configs and trained is not None:  # a `ctk train --qat int8` checkpoint: its ranges, not a calibration
            quant_configs = with_learned_ranges(quant_configs, qat.learned_ranges(trained.model_state))
        int8, dense_int8 = quantize_job.export_options(loaded, quant_configs, work) if quant_configs else ({}, {})
        with timed("measure dense model"):
            report = ExportReport(loaded.name, job.prune.sparsity if job.pruned else 0.0, list(loaded.notes),
                                  export_measure.measure(dense, loaded, work, dense))
        export_prune.run(job, loaded, work, dense, report, trained, timed)
        with timed("capture and strip"):
            stripped = strip(loaded.module, loaded.example_inputs)
        report.strip = strip_summary(stripped).to_dict()
        with timed("measure stripped model"):
            report.stripped = export_measure.measure(PositionalInputs(stripped), loaded, work, dense)
        formats = _formats(job, stripped, loaded, report)
        with timed(f"export and verify {', '.join(formats)}"):
            artifacts = export(stripped, loaded.example_inputs, str(staging), formats, reference=loaded.module,
                               sparse_onnx=job.sparse_onnx, pretrained=loaded.pretrained,
                               tokenizer=loaded.tokenizer, **int8)
        with timed("export dense model for comparison"):
            dense_artifacts = export(dense, loaded.example_inputs, str(staging / "dense"),
                                     tuple(f for f in DENSE_FORMATS if f in formats), **dense_int8)
        with timed(f"{metrics.RUNTIMES[job.runtime].title} latency, dense vs stripped"):
            report.latency = export_measure.latency(report, artifacts, dense_artifacts, loaded, job.latency_rounds,
                                                    job.runtime)
        if report.pruning and "target" in report.pruning:  # the measured speedup beside the target
            report.pruning["target"].update(export_prune.target_met(job, report))
        if work is not None:
            with timed(f"measure {work.task.metric} of the ONNX artifact in ONNX Runtime"):
                report.metric = export_measure.metric_summary(report, work, next(a for a in artifacts if a.format == "onnx"),
                                                              dense)
        if quant_configs:
            with timed("int8: test accuracy, sizes, latency at batch 1 and 8"):
                report.quantization = quantize_job.section(artifacts, dense_artifacts, staging, loaded,
                                                           max(2, job.latency_rounds // 4), work)
        if "openvino" in formats:
            with timed("ONNX Runtime and OpenVINO latency of every model, batch 1 and 8"):
                onnx_artifact = next(a for a in artifacts if a.format == "onnx")
                report.runtimes = runtimes_report.section(artifacts, dense_artifacts, staging, loaded.example_inputs,
                                                          onnx_artifact.static_batch, max(2, job.latency_rounds // 4),
                                                          export_measure.LATENCY_BUDGET_S)
        report.artifacts = [_relative(a.to_dict(), staging) for a in artifacts]
        report.sparse_onnx = export_measure.sparse_onnx_ratio(artifacts)
        report.dense.artifacts = [_relative(a.to_dict(), staging) for a in dense_artifacts]
        report.pipeline = log.to_dict()
        report.environment = export_measure.environment()
        report.write(staging)
    report.out = str(job.out_dir)
    return report.to_dict()


def _formats(job: ExportJob, stripped: nn.Module, loaded: LoadedModel, report: ExportReport) -> tuple[str, ...]:
    """The formats to write: ONNX always (the metric is measured in ONNX Runtime, latency by
    default, and the OpenVINO IR is converted from it), and ``hf`` only when a ``transformers``
    config describes the stripped widths; otherwise it is skipped with the reason in
    ``report.skipped`` and the notes, and the other formats are still written."""
    formats = tuple(dict.fromkeys((*job.formats, "onnx")))
    reason = hf_format.problem(stripped, loaded.pretrained) if "hf" in formats else ""
    if reason:
        report.skipped["hf"] = reason
        report.notes.append(f"hf folder not written: {reason}")
        formats = tuple(f for f in formats if f != "hf")
    return formats


def _timer(log: PipelineLog, step: Step | None) -> Callable[[str], AbstractContextManager]:
    """``timed(name)``: a block shown as a progress step and timed as a stage of ``log``."""

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        with step(name) if step else contextlib.nullcontext(), log.stage(name):
            yield

    return timed


def _recipe_quant_configs(job: ExportJob) -> tuple[QuantizeConfig, ...]:
    """The recipe's quantize: section. Export prunes by --sparsity, not by a recipe (that is
    `ctk prune --recipe`, whose weights come here as --weights), so --pruned would ignore half of it."""
    if job.pruned:
        raise CtkError(f"--recipe {job.recipe}: ctk export takes only its quantize: section; prune by the recipe "
                       "with `ctk prune --recipe` and pass its pruned.safetensors as --weights, without --pruned")
    configs = load_recipe(job.recipe).quantize
    if not configs:
        raise CtkError(f"--recipe {job.recipe} has no quantize: section (the only one ctk export reads)")
    return configs


def _read_checkpoint(job: ExportJob) -> Checkpoint:
    """The ``ctk train`` checkpoint, read and matched to ``--model`` before any heavy work."""
    checkpoint = load_checkpoint(job.checkpoint)  # type: ignore[arg-type]
    trained = checkpoint.meta.get("config", {}).get("model")
    if trained is not None and trained != job.model:
        raise CtkError(f"--checkpoint {checkpoint.path} was trained on --model {trained!r}, not {job.model!r}")
    return checkpoint


def _relative(entry: dict[str, Any], staging: Path) -> dict[str, Any]:
    entry["path"] = str(Path(entry["path"]).relative_to(staging))
    return entry


