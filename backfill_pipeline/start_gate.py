"""Runs of one ``materialize --parallel`` start a few at a time.

A run spends its first second on the CPU (Dagster's run and event log, the read, detection) and the rest
mostly waiting on providers. Started all at once, N runs on fewer cores share them while starting, and
every partition's first request leaves late: against a rate limit, time in which the provider's full
bucket is wasted. Through this gate at most one run per two cores (per core when no budget paces the
calls) is starting at a time; the next begins when one reaches its provider calls (or ends). A run that
died holding a place is waited for at most ``WAIT_SECONDS``: the gate orders starts, it never stops one.

The gate is a ``multiprocessing`` semaphore made by the CLI before it forks its workers; without one
(a run in Dagster's own processes, ``--parallel 1``) nothing waits.
"""

from __future__ import annotations

import os
from typing import Any

from .config import DatasetConfig

WAIT_SECONDS = 15.0

_gate: dict[str, Any] = {"semaphore": None, "held": False}


def paced(dataset: DatasetConfig) -> bool:
    """Whether a rate budget paces the dataset's provider calls: limits configured, or a provider's own
    service (which always has them, learned from its headers). Batch mode is never paced."""
    specs = [dataset.embedding, *([dataset.enrichment] if dataset.enrichment.enabled else [])]
    return any(
        spec.mode != "batch"
        and (
            bool(spec.rate_limit.requests_per_minute or spec.rate_limit.tokens_per_minute)
            or (spec.provider in ("openai", "gemini") and not spec.base_url)
        )
        for spec in specs
    )


def make(context: Any, paced: bool) -> Any:
    """A gate for the workers of a ``multiprocessing`` context. Paced, a place per two cores: a starting run
    keeps the database about as busy as itself, and the first requests matter most (on two cores they left
    0.4 s sooner than with a place per core). Unpaced, a place per core: nothing waits on the first request,
    and runs starting together keep both cores busy (8% more rows per second unthrottled)."""
    cores = os.cpu_count() or 1
    return context.Semaphore(max(1, cores // 2 if paced else cores))


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
