"""A graceful stop: the first Ctrl+C or SIGTERM asks the run to finish what it has paid for and stop.

Dagster turns an interrupt inside a step into a retry of that step (with a retry policy) or into an
abrupt failure, losing the answers of requests in flight. So while a step runs, these signals only set a
flag: the engine sends nothing more, waits a short grace for the requests in flight (their answers are
cached), the step writes the completed rows, and the run then ends as canceled. A second signal stops at
once: by the handler that was there before (Dagster's), or, under the CLI, by ending the process, with
nothing half-written (every write batch is a transaction of its own).

The flag is a ``multiprocessing.Event`` made at import, so workers forked by ``materialize --parallel``
share it with the CLI process that receives the signal.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

_requested = multiprocessing.Event()
_reason: dict[str, str] = {}
_written: dict[str, int] = {}
_exit_on_second = {"on": False}
_seen = {"signals": 0}  # by this process: with Ctrl+C, the CLI and its workers each receive one
_runs: dict[str, str | None] = {"current": None, "stopped": None}  # run ids, in this process
SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_AT_ONCE = 130  # the shell's status for a process ended by Ctrl+C


class StopRequested(Exception):
    """Raised where work would start after a stop was requested; nothing was paid for."""


def requested() -> bool:
    return _requested.is_set()


def reason() -> str:
    return _reason.get("why", "a stop request")


def request(why: str) -> None:
    _reason["why"] = why
    _runs["stopped"] = _runs["current"]
    _requested.set()


def interrupted(why: str) -> None:
    """A signal another handler received (Dagster's, between a run's steps) asks for the graceful stop: it
    counts as this process's first, so the next one stops at once."""
    _seen["signals"] = max(_seen["signals"], 1)
    if not requested():
        request(why)


def enter_run(run_id: str) -> None:
    """Called by each step: a stop asked for during an earlier run of this process (a notebook, a test)
    does not stop the next one."""
    if _runs["stopped"] is not None and _runs["stopped"] != run_id:
        reset()
    _runs["current"] = run_id


def record_written(rows: int) -> None:
    """What the step that stopped wrote, for the run's closing message and the CLI's line."""
    _written["rows"] = _written.get("rows", 0) + rows


def written() -> int:
    return _written.get("rows", 0)


def reset() -> None:
    """Clear the flag (a new CLI command, or a test)."""
    _reason.pop("why", None)
    _written.clear()
    _seen["signals"] = 0
    _runs["stopped"] = None
    _requested.clear()


def _signal_name(signum: int) -> str:
    return "Ctrl+C" if signum == signal.SIGINT else signal.Signals(signum).name


@contextmanager
def graceful_signals(at_once: Callable[[], None] | None = None) -> Iterator[None]:
    """Within the block, the first SIGINT/SIGTERM requests a graceful stop; a second one calls ``at_once``
    (when given) or the handler that was installed before. Outside the main thread, does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    handle = _handler(previous, at_once)
    for s in SIGNALS:
        signal.signal(s, handle)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _handler(previous: dict, at_once: Callable[[], None] | None) -> Callable[[int, FrameType | None], None]:
    def handle(signum: int, frame: FrameType | None) -> None:
        _seen["signals"] += 1
        if _seen["signals"] == 1:
            if not requested():
                request(_signal_name(signum))
                log.warning(
                    f"stop requested by {_signal_name(signum)}: sending nothing more, finishing the requests in "
                    "flight and writing what is done; press Ctrl+C again to stop at once"
                )
            return
        if at_once is not None:
            at_once()
        if _exit_on_second["on"]:
            exit_at_once()
        before = previous.get(signum)
        if callable(before):
            before(signum, frame)
        else:
            raise KeyboardInterrupt

    return handle


def install_for_process() -> None:
    """For the life of this process (a CLI worker): the first signal asks for a graceful stop, the second
    ends the process at once."""
    exit_on_second_signal()
    handler = _handler(previous={}, at_once=None)
    for s in SIGNALS:
        signal.signal(s, handler)


def exit_on_second_signal() -> None:
    """Make a second signal end the process at once, in this process and the workers it forks (the CLI)."""
    _exit_on_second["on"] = True


def exit_at_once() -> None:
    """Under the CLI, a second signal ends this process now (no cleanup; the next run marks the run failed)."""
    os.write(2, b"\nstopped at once; the next run picks up where this one left off\n")
    os._exit(EXIT_AT_ONCE)
