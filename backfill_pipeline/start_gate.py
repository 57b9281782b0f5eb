"""Runs of one ``materialize --parallel`` start a core at a time.

A run spends its first second on the CPU (Dagster's run and event log, the read, detection) and the rest
mostly waiting on providers. Started all at once, N runs on fewer cores share them while starting, and
every partition's first request leaves late: against a rate limit, time in which the provider's full
bucket is wasted. Through this gate at most one run per two cores is starting at a time (on two cores the
first request left 0.4 s sooner than with one per core); the next begins when one reaches its provider
calls (or ends). A run that died holding a place is waited for at most
``WAIT_SECONDS``: the gate orders starts, it never stops one.

The gate is a ``multiprocessing`` semaphore made by the CLI before it forks its workers; without one
(a run in Dagster's own processes, ``--parallel 1``) nothing waits.
"""

from __future__ import annotations

import os
from typing import Any

WAIT_SECONDS = 15.0

_gate: dict[str, Any] = {"semaphore": None, "held": False}


def make(context: Any) -> Any:
    """A gate for the workers of a ``multiprocessing`` context: a place per two cores, since a starting run
    keeps the database (its run, event log and reads) about as busy as itself."""
    return context.Semaphore(max(1, (os.cpu_count() or 2) // 2))


def install(semaphore: Any) -> None:
    """In a worker: the gate its runs pass through."""
    _gate["semaphore"], _gate["held"] = semaphore, False


def enter() -> None:
    """Before a run starts: wait for a place."""
    semaphore = _gate["semaphore"]
    if semaphore is not None and not _gate["held"]:
        _gate["held"] = semaphore.acquire(timeout=WAIT_SECONDS)


def started() -> None:
    """The run reached its provider calls (or ended): let the next one start."""
    semaphore = _gate["semaphore"]
    if semaphore is not None and _gate["held"]:
        _gate["held"] = False
        semaphore.release()
