"""A partition's lease: taken by the step that works on it, renewed while it works, expired without.

Two runs of one partition (a UI backfill and the sensor, say) must not both pay for its rows, and a run
killed mid-way (``kill -9``, a lost machine) must not hold its partition for ever. So a lease records
when its holder last renewed it; a step renews it every quarter of ``seconds`` from a thread of its
own, and a lease not renewed for ``seconds`` is taken over by the next run, whatever launched either.
Every paying or writing step takes it, so a retry or re-execution from failure holds it too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .stores import Store

log = logging.getLogger(__name__)

# (holder's run id, seconds since its last renewal) -> whether it may still be working
IsAlive = Callable[[str, float], bool]


def fresh_within(seconds: float, finished: Callable[[str], bool] = lambda run_id: False) -> IsAlive:
    """A holder is alive while it renewed within ``seconds`` and is not known to have finished."""

    def alive(run_id: str, age_seconds: float) -> bool:
        return age_seconds < seconds and not finished(run_id)

    return alive


@dataclass(frozen=True)
class Lease:
    open_store: Callable[[], Store]
    key: str
    run_id: str
    is_alive: IsAlive
    seconds: float

    @contextmanager
    def held(self) -> Iterator[str | None]:
        """Take the lease and keep it renewed for the block; yield None, or the live holder's run id
        when another run has it (then nothing is taken and the block should do nothing)."""
        with self.open_store() as store:
            holder = store.ledger.claim_partition(self.key, self.run_id, self.is_alive)
        if holder is not None:
            yield holder
            return
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew_until, args=(stop,), name=f"lease {self.key}", daemon=True)
        renewer.start()
        try:
            yield None
        finally:
            stop.set()
            renewer.join()

    def _renew_until(self, stop: threading.Event) -> None:
        while not stop.wait(self.seconds / 4):
            try:
                with self.open_store() as store:
                    if not store.ledger.renew_lease(self.key, self.run_id):
                        log.warning(f"partition {self.key}: the lease of run {self.run_id} was taken over")
            except Exception as exc:  # noqa: BLE001 - the next renewal tries again; the lease lasts 4 of them
                log.warning(f"partition {self.key}: could not renew the lease: {exc}")

    def release(self) -> None:
        with self.open_store() as store:
            store.ledger.release_partition(self.key, self.run_id)


def held_message(key: str, holder: str) -> str:
    return (
        f"partition {key} is being processed by run {holder}; this run skips it "
        "(nothing read, no provider called, nothing written)"
    )
