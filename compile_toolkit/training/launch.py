"""``ctk train --nproc-per-node N``: the command starts its own workers under torchrun's elastic agent.

The agent is torchrun itself (``torch.distributed.run``), run in this process with
``--standalone`` (a rendezvous on a free local port), so users need not find the ``torchrun``
script, and a run behaves exactly as under ``torchrun --nproc-per-node N -m compile_toolkit train``:
the same environment for each worker, and with ``--max-restarts K`` a failed worker stops the
others and all are started again (up to K times; with ``--resume`` they continue from the newest
checkpoint). Each worker runs ``ctk train`` with the same options minus the launcher's own, so a
worker never launches again.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import CtkError
from .config import MAX_PROCESSES, MAX_RESTARTS, check_count

LAUNCH_OPTIONS = ("nproc_per_node", "max_restarts")


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


def launch(argv: list[str], nproc: int, max_restarts: int) -> int:
    """Run ``python -m compile_toolkit`` + ``argv`` on ``nproc`` local workers; 0 when all finished."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    check_count("--nproc-per-node", nproc, 1, MAX_PROCESSES)
    check_count("--max-restarts", max_restarts, 0, MAX_RESTARTS)
    if "LOCAL_RANK" in os.environ:
        raise CtkError("--nproc-per-node starts the workers itself: drop it when torchrun already started this one")
    options = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "--max-restarts",
                                            str(max_restarts), "-m", "compile_toolkit", *argv])
    try:
        run(options)
    except ChildFailedError as error:
        failures = error.failures
        ranks = ", ".join(f"rank {rank} (exit code {failure.exitcode})" for rank, failure in sorted(failures.items()))
        print(f"ctk: error: training workers failed after {max_restarts} restart(s): {ranks}; their errors are above",
              file=sys.stderr, flush=True)
        return 1
    return 0
