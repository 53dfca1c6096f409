"""How a torchrun worker ends when its run fails: it reports the error within a time limit, then exits.

A worker's stderr is a pipe to whoever started it (torchrun's agent, a scheduler, a test). When the
reader has stopped reading, the pipe fills and a plain ``print`` of the error blocks for good: a
failed DDP worker once sat 1 h 45 min in ``print`` while its peers and agent waited on it. So the
report is written by a helper thread, the worker waits for it at most :data:`REPORT_TIMEOUT_S`
seconds, and then leaves with ``os._exit`` (no interpreter shutdown, which would flush the same
blocked stream again). The run's own cleanup (``finally`` blocks: the process group, staging
folders) has already run when the exception reaches here.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from ..errors import CtkError

REPORT_TIMEOUT_S = 5.0
FAILED = 1  # the exit status of a failed command, as ``ctk`` returns it


def is_torchrun_worker() -> bool:
    """Whether this process is one of the workers a launcher started (torchrun sets ``LOCAL_RANK``)."""
    return "LOCAL_RANK" in os.environ


def exit_on_failure(run: Callable[[], int]) -> int:
    """``run()``'s status; if it raises, the error (one ``ctk: error:`` line, or a traceback for a
    bug) is written within the time limit and the process exits with status 1."""
    try:
        return run()
    except CtkError as error:
        report: Callable[[], object] = functools.partial(sys.stderr.write, f"ctk: error: {error}\n")
    except Exception:  # noqa: BLE001 - a bug: its traceback, through the installed hook (torch adds the rank)
        report = functools.partial(sys.excepthook, *sys.exc_info())
    _report_and_exit(report)


def _report_and_exit(report: Callable[[], object]) -> NoReturn:
    """Run ``report`` and flush both streams on a daemon thread; exit when it is done or after the time limit."""
    def write() -> None:
        for step in (report, sys.stderr.flush, sys.stdout.flush):
            try:
                step()
            except (OSError, ValueError):  # a closed pipe or stream: what could be written has been
                pass

    thread = threading.Thread(target=write, name="ctk-failure-report", daemon=True)
    thread.start()
    thread.join(REPORT_TIMEOUT_S)
    os._exit(FAILED)
