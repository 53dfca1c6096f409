"""``ctk train --nproc-per-node N``: the command starts its own workers under torchrun's elastic agent.

The agent is torchrun itself (``torch.distributed.run``), run in this process, so users need not
find the ``torchrun`` script, and a run behaves exactly as under ``torchrun --nproc-per-node N -m
compile_toolkit train``: the same environment for each worker, and with ``--max-restarts K`` a
failed worker stops the others and all are started again (up to K times; with ``--resume`` they
continue from the newest checkpoint). On one machine the rendezvous is ``--standalone`` (a free
local port); with ``--nnodes`` every machine runs the same command and they meet at
``--rdzv-endpoint``. Each worker runs ``ctk train`` with the same options minus the launcher's
own, so a worker never launches again.

Before any worker starts, the launcher checks what every worker would otherwise find on its own,
each with its own traceback: the strategy, how the global batch splits, the tensor-parallel mesh
and the ``--tp-plan`` against the model's shapes. SIGTERM (or Ctrl-C) stops the workers and ends
the command like ``ctk export``: ``ctk: terminated``, status 143 (130). The agent's log folder is
removed when the command ends.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from torch.utils.data import DataLoader

from ..errors import CtkError, Terminated, shown
from ..tasks import model_inputs
from .config import MAX_NODES, MAX_PROCESSES, MAX_RESTARTS, TrainConfig, check_batch_split, check_count
from .strategies import WORKER_STRATEGIES

LAUNCH_OPTIONS = ("nproc_per_node", "max_restarts", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_backend")
RDZV_BACKENDS = ("c10d", "static")
# The signals torchrun's agent turns into SignalException (after stopping the workers).
AGENT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
                      if hasattr(signal, name))


@dataclass(frozen=True)
class Nodes:
    """The machines of a launch, as torchrun takes them: ``count`` machines each running the same
    command, meeting at ``endpoint`` (``HOST:PORT``). ``c10d`` hosts the rendezvous on ``HOST`` and
    numbers the machines as they join; ``static`` uses each machine's ``rank`` (``HOST`` is rank 0's)."""

    count: int = 1
    rank: int = 0
    endpoint: str | None = None
    backend: str = "c10d"

    def check(self) -> None:
        """One line for an option torchrun would refuse with a traceback, or silently misuse."""
        check_count("--nnodes", self.count, 1, MAX_NODES)
        check_count("--node-rank", self.rank, 0, self.count - 1)
        if self.backend not in RDZV_BACKENDS:
            raise CtkError(f"unknown --rdzv-backend {shown(self.backend)}; valid: {', '.join(RDZV_BACKENDS)}")
        if self.endpoint is None:
            if self.count > 1:
                raise CtkError(f"--nnodes {self.count} needs --rdzv-endpoint HOST:PORT, an address every machine "
                               "reaches (docs/ddp.md)")
            return
        found = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})", self.endpoint)
        if found is None or not 1 <= int(found[2]) <= 65535:
            raise CtkError(f"--rdzv-endpoint must be HOST:PORT (a port 1-65535), got {shown(self.endpoint)}")

    def torchrun_flags(self) -> list[str]:
        """torchrun's rendezvous options: ``--standalone`` on one machine with no endpoint."""
        if self.count == 1 and self.endpoint is None:
            return ["--standalone"]
        return ["--nnodes", str(self.count), "--node-rank", str(self.rank), "--rdzv-backend", self.backend,
                "--rdzv-endpoint", str(self.endpoint)]


def worker_argv(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The ``ctk train`` command line of ``args`` (every option off its default), without the
    launcher's options: what each worker runs."""
    argv = ["train"]
    for action in parser._actions:  # argparse has no public list of a parser's options
        if not action.option_strings or action.dest in (*LAUNCH_OPTIONS, "help"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        argv += [flag] if action.nargs == 0 else [flag, str(value)]
    return argv


def check_launch(config: TrainConfig, nproc: int, max_restarts: int, nodes: Nodes) -> None:
    """Everything about ``config`` that depends on how many workers start, checked before they do:
    otherwise every worker finds the same problem after its start, each with its own traceback."""
    check_count("--nproc-per-node", nproc, 1, MAX_PROCESSES)
    check_count("--max-restarts", max_restarts, 0, MAX_RESTARTS)
    nodes.check()
    if "LOCAL_RANK" in os.environ:
        raise CtkError("--nproc-per-node starts the workers itself: drop it when torchrun already started this one")
    if config.strategy not in WORKER_STRATEGIES:
        raise CtkError(f"--nproc-per-node starts torchrun workers: use --strategy ddp, fsdp or tp, "
                       f"not {config.strategy}")
    processes = nproc * nodes.count
    shares = processes
    if config.strategy == "tp":
        from .tp import tp_mesh

        shape = tp_mesh(config.mesh, processes, f"--nproc-per-node {nproc}" + (
            f" on --nnodes {nodes.count} machines start" if nodes.count > 1 else " starts"))
        shares = shape.data
        if config.tp_plan is not None:
            _check_plan(config, shape.model)
    check_batch_split(config.batch_size, shares, config.strategy)


def _check_plan(config: TrainConfig, size: int) -> None:
    """``--tp-plan`` read against the model, and run on two validation samples with its layers cut
    to one rank's shard (:func:`~.tp_check.check_plan_shapes`): the model is built here once, shapes only."""
    from .run_setup import build_parts
    from .tp_check import check_plan_shapes
    from .tp_plan import read_plan

    parts = build_parts(config)
    model = parts.loaded.module
    plan = read_plan(config.tp_plan, model, size)  # type: ignore[arg-type]
    batch = next(iter(DataLoader(parts.workload.splits.val, batch_size=2)))
    check_plan_shapes(model, plan, size, model_inputs(batch), f"--tp-plan {config.tp_plan}")


def launch(argv: list[str], nproc: int, max_restarts: int, nodes: Nodes) -> int:
    """Run ``python -m compile_toolkit`` + ``argv`` on ``nproc`` local workers of ``nodes`` (checked
    by :func:`check_launch`); 0 when all finished. A signal to this process stops the workers and
    raises what ``ctk`` reports for it (:class:`Terminated`, KeyboardInterrupt)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    with _agent_log_dir() as log_dir, _signal_handlers_kept():
        options = get_args_parser().parse_args([*nodes.torchrun_flags(), "--nproc-per-node", str(nproc),
                                                "--max-restarts", str(max_restarts), "--log-dir", log_dir,
                                                "-m", "compile_toolkit", *argv])
        try:
            run(options)
        except ChildFailedError as error:
            ranks = ", ".join(f"rank {rank} (exit code {failure.exitcode})"
                              for rank, failure in sorted(error.failures.items()))
            print(f"ctk: error: training workers failed after {max_restarts} restart(s): {ranks}; their errors are "
                  "above", file=sys.stderr, flush=True)
            return 1
        except SignalException as stopped:  # the agent has stopped the workers already
            raise _as_interruption(stopped.sigval) from None
    return 0


@contextlib.contextmanager
def _agent_log_dir() -> Iterator[str]:
    """A folder for the agent's per-attempt files, removed afterwards: left to itself the agent
    makes a ``/tmp/torchelastic_*`` folder per run and never removes it."""
    folder = tempfile.mkdtemp(prefix="ctk-torchelastic-")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """The agent's handlers (which raise SignalException) only while it runs: it installs them
    when the workers start and leaves them behind, where a late signal would be a traceback.
    Off the main thread neither it nor this sets any."""
    main = threading.current_thread() is threading.main_thread()
    kept = {number: signal.getsignal(number) for number in AGENT_SIGNALS} if main else {}
    try:
        yield
    finally:
        for number, handler in kept.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be put back
                signal.signal(number, handler)


def _as_interruption(number: int) -> BaseException:
    """What ``ctk`` reports for the signal the agent stopped on: SIGTERM is :class:`Terminated`
    (``ctk: terminated``, 143), Ctrl-C KeyboardInterrupt (130); SIGHUP and SIGQUIT end with their
    own 128 + N."""
    if number == signal.SIGTERM:
        return Terminated()
    if number == signal.SIGINT:
        return KeyboardInterrupt()
    print(f"ctk: terminated by {signal.Signals(number).name}", file=sys.stderr, flush=True)
    return SystemExit(128 + number)
