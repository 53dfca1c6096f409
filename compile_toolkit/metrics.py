"""What a stripped model costs and how well it still works: parameters, FLOPs, accuracy, and
latency in ONNX Runtime or OpenVINO, measured so that two models can be compared fairly on a
noisy machine."""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import openvino_runtime
from .capture import Inputs
from .errors import CtkError, summary
from .onnx_runtime import feeds, session

T = TypeVar("T")

Runner = Callable[[], object]  # one inference of a model on fixed inputs, as latency timing calls it
# A runtime's session of a small model starts in a fast or a slow state and keeps it: digits-resnet
# stripped to 25% of its channels ran 27 or 39 us per run in ONNX Runtime with 2 threads, one session
# in four slow (the dense file's sessions all alike), so one session per model made its speedup a
# coin flip: 1.42x-2.19x in 12 comparisons. The fastest of 3 sessions per model gave 2.03x-2.06x in
# 12. Models whose runs take longer than SESSIONS_BELOW_MS get one session: a session of a large model
# costs its weights' memory again, and its runs are long enough for such states not to show.
SESSIONS, SESSIONS_BELOW_MS = 3, 1.0


def count_params(module: nn.Module) -> int:
    """Number of parameter elements (shared parameters once; buffers such as BN statistics are
    not parameters and are not counted)."""
    return sum(p.numel() for p in module.parameters())


def count_flops(module: nn.Module, example_inputs: Inputs) -> int:
    """FLOPs of one forward pass for ONE sample (the first row of every input), so numbers are
    per image whatever the example batch. Counted by ``FlopCounterMode`` at the ATen level (a
    multiply-add is 2 FLOPs; elementwise ops are not counted), which also works on exported
    GraphModules whose batch is dynamic (one from a static ``torch.export`` refuses batch 1).

    ``nn.MultiheadAttention``'s fused eval fast path is switched off while counting: the counter
    does not see inside it (a ViT would count 5.9 GFLOPs eager against 8.7 in its graph)."""
    one = tuple(t[:1] for t in example_inputs)
    counter = FlopCounterMode(display=False)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter, torch.no_grad():
            module(*one)
    except Exception as error:  # the user's model: any failure at batch 1 is theirs to see
        raise CtkError(f"count_flops runs {type(module).__name__} on one sample (batch 1) and "
                       f"it fails: {summary(error)}") from error
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops())


def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of rows of ``x`` whose arg-max logit equals the label in ``y``, in batches so a
    whole test set fits in memory."""
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            logits = module(x[start:start + batch_size])
            correct += int((logits.argmax(dim=1) == y[start:start + batch_size]).sum())
    return correct / len(x)


def default_threads() -> int:
    """The cores this process may use (and torch is set to use), at most 2: the latency numbers are
    meant to be comparable across machines, not to show off a big one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(2, cores or 1, torch.get_num_threads()))


def ort_latency_ms(onnx_path: str, inputs: Inputs, threads: int | None = None,
                   warmup: int = 10, iters: int = 50) -> float:
    """Median wall time in ms of ``InferenceSession.run`` on ``inputs`` (CPU provider,
    ``threads`` intra-op threads, default :func:`default_threads`). The median, because single
    runs on a shared machine have a long tail of slow outliers."""
    return RUNTIMES["ort"].latency_ms(onnx_path, inputs, threads, warmup, iters)


def compare_latency_ms(onnx_a: str, onnx_b: str, inputs: Inputs, rounds: int = 20,
                       threads: int | None = None, warmup: int = 10,
                       iters: int = 10, budget_s: float | None = None) -> dict[str, float]:
    """Latency of model A against model B: ``{"a_ms", "b_ms", "ratio", "rounds"}`` with the medians
    of A and of B, the median of the per-round ratios A/B, and the rounds timed.

    Why not two :func:`ort_latency_ms` calls: on this kind of machine (2 shared cores, frequency
    scaling, noisy neighbours) whichever model runs first or second is systematically favoured,
    and the machine's speed drifts over seconds. So each round times ``iters`` runs of both
    models back to back, alternating the order (A B, B A, A B, ...) so the order bias cancels,
    and the ratio is taken within each round so the drift, which hits A and B alike, cancels too.

    ``budget_s``: fewer rounds (an even number, at least 4) where ``rounds`` would take longer, as
    the warm-up's runs time them: 60 rounds of 10 runs suit a small convnet, not a language
    model's prefill at a fifth of a second a run.
    """
    return RUNTIMES["ort"].compare(onnx_a, onnx_b, inputs, rounds, threads, warmup, iters, budget_s)


def round_order(names: list[T], round_index: int) -> list[T]:
    """The order of one round: rotated every two rounds and reversed every other one (A B C, C B A,
    B C A, A C B, ...), so that over the rounds each model runs in every position and after every
    other model. Reversal alone would leave the middle model always in the middle, always right
    after a big model in half the rounds: measured, that made the same file look 25% slower."""
    shift = (round_index // 2) % len(names)
    rotated = names[shift:] + names[:shift]
    return rotated if round_index % 2 == 0 else rotated[::-1]


def _ort_runner(onnx_path: str, inputs: Inputs, threads: int | None) -> Runner:
    """One ``InferenceSession.run`` on ``inputs``, as a call."""
    sess = session(onnx_path, threads=threads or default_threads())
    feed = feeds(sess, tuple(inputs))
    return functools.partial(sess.run, None, feed)


def _openvino_runner(xml_path: str, inputs: Inputs, threads: int | None) -> Runner:
    """One OpenVINO inference on ``inputs``, as a call (the request holds its compiled model)."""
    request = openvino_runtime.compile_model(xml_path, threads or default_threads()).create_infer_request()
    return functools.partial(request.infer, openvino_runtime.feed(inputs))


@dataclass(frozen=True)
class Runtime:
    """A runtime model files are timed in: its name in reports, the export format it runs at each
    precision, and how one file of it runs on fixed inputs."""

    name: str
    title: str
    formats: dict[str, str]  # precision -> the export format whose file this runtime runs
    runner: Callable[[str, Inputs, int | None], Runner]

    def latency_ms(self, path: str, inputs: Inputs, threads: int | None = None, warmup: int = 10,
                   iters: int = 50) -> float:
        """Median wall time in ms of one run of the file on ``inputs`` after ``warmup`` runs."""
        run = self.runner(path, inputs, threads)
        for _ in range(warmup):
            run()
        return statistics.median(_time_runs(run, iters))

    def compare(self, path_a: str, path_b: str, inputs: Inputs, rounds: int = 20, threads: int | None = None,
                warmup: int = 10, iters: int = 10, budget_s: float | None = None) -> dict[str, float]:
        """Latency of file A against file B in this runtime: see :func:`compare_latency_ms`. An
        OpenVINO IR is compiled as it was verified (fp32 inference precision pinned)."""
        timing = _compare_many({"a": functools.partial(self.runner, path_a, inputs, threads),
                                "b": functools.partial(self.runner, path_b, inputs, threads)},
                               rounds, warmup, iters, budget_s)
        return {"a_ms": timing["a"]["ms"], "b_ms": timing["b"]["ms"], "ratio": timing["b"]["speedup"],
                "rounds": timing["a"]["rounds"]}


# Where a model file can be timed (``--runtime``), by name: every table of runtimes reads this one.
RUNTIMES = {runtime.name: runtime for runtime in (
    Runtime("ort", "ONNX Runtime", {"fp32": "onnx", "int8": "onnx-int8"}, _ort_runner),
    Runtime("openvino", "OpenVINO", {"fp32": "openvino", "int8": "openvino-int8"}, _openvino_runner),
)}


def _time_runs(run: Runner, iters: int) -> list[float]:
    """A block of ``iters`` timed runs after one untimed run: the first run after another model's
    finds the caches and the vector units in that model's state (a small int8 model then runs 2x
    slower than back to back: shared/FACTS.md), which a deployed model does not see."""
    run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def compare_latency_many(onnx_paths: dict[str, str], inputs: Inputs, rounds: int = 20,
                         threads: int | None = None, warmup: int = 10,
                         iters: int = 10) -> dict[str, dict[str, float]]:
    """:func:`compare_latency_ms` for more than two models: ``{name: {"ms", "speedup"}}``, where
    ``speedup`` is the median over rounds of (first model's time / this model's time) within the
    round. The order changes every round (:func:`round_order`) so that the position bias of this
    kind of machine cancels."""
    return compare_runtimes({name: ("ort", path) for name, path in onnx_paths.items()}, inputs, rounds, threads,
                            warmup, iters)


def compare_runtimes(models: dict[str, tuple[str, str]], inputs: Inputs, rounds: int = 20,
                     threads: int | None = None, warmup: int = 10, iters: int = 10,
                     budget_s: float | None = None) -> dict[str, dict[str, float]]:
    """:func:`compare_latency_many` across runtimes: ``models`` maps a name to ``(runtime, path)``
    (:data:`RUNTIMES`), the first being the baseline of the speedups; an OpenVINO IR is compiled as
    it was verified (fp32 pinned). ``budget_s`` caps the rounds as in :func:`compare_latency_ms`."""
    makers = {name: functools.partial(RUNTIMES[runtime].runner, path, inputs, threads)
              for name, (runtime, path) in models.items()}
    return _compare_many(makers, rounds, warmup, iters, budget_s)


def _compare_many(makers: dict[str, Callable[[], Runner]], rounds: int, warmup: int, iters: int,
                  budget_s: float | None = None) -> dict[str, dict[str, float]]:
    """The alternated rounds of :func:`compare_latency_many`; ``makers`` open a session of each
    model (:data:`SESSIONS` of a model whose warm-up runs took under :data:`SESSIONS_BELOW_MS`, the median),
    and a model's time in a round is its fastest session's block."""
    sessions = {name: [make()] for name, make in makers.items()}
    spent: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(warmup):
        for name, (run,) in sessions.items():
            started = time.perf_counter()
            run()
            spent[name].append(time.perf_counter() - started)
    per_run_s = {name: statistics.median(times) if times else 0.0 for name, times in spent.items()}
    for name, make in makers.items():
        if warmup and per_run_s[name] * 1000.0 < SESSIONS_BELOW_MS:
            sessions[name] += [make() for _ in range(SESSIONS - 1)]
            for run in sessions[name][1:]:
                for _ in range(warmup):
                    run()
    if budget_s is not None and warmup:
        per_round = sum(per_run_s[name] * iters * len(runs) for name, runs in sessions.items())
        rounds = min(rounds, max(4, int(budget_s / per_round) // 2 * 2))
    names = list(makers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in round_order(names, round_index):
            times[name].append(min(statistics.median(_time_runs(run, iters)) for run in sessions[name]))
    base = times[names[0]]
    return {name: {"ms": statistics.median(ts),
                   "speedup": statistics.median([b / t for b, t in zip(base, ts, strict=True)]), "rounds": rounds}
            for name, ts in times.items()}
