"""``mode: batch``: a stage's texts go to the provider's batch API at its discount, not to the realtime one.

The skeleton is the realtime one's (texts cut and counted, answers already paid for taken from the cache,
identical texts sent once, answers read and validated by the stage, failures recorded as they come); what
differs is how texts reach the provider and how the run waits:

1. The partition's open batches for the stage are looked up in the journal (``backfill_batches``): a
   batch a killed or retried run submitted is polled again, never submitted twice. A batch recorded but
   without its id (the run died while submitting) is looked for at the provider by its label.
2. Texts in no open batch are cut into request lines within the provider's per-request limits, and the
   lines into batches within the batch limits. Each batch is recorded before its file is uploaded and
   gets its id as soon as the provider answers.
3. The run polls every ``poll_seconds`` and logs each batch's state, counts and the time waited. Finished
   batches are collected at once: answers validated and cached, failed lines recorded as row failures
   with the provider's words, lines an expired or cancelled batch left unanswered re-queued (the next run
   submits them again). After ``wait_minutes`` (or a stop), the run ends with what is done; the rest waits
   in the provider's batches for the next run of the partition.

Waiting inside the run (rather than ending it and completing the partition from a sensor) keeps one
run per partition, its progress and logs in one place, and the write right after the answers; what makes
it survive a restart of everything is the journal, which a sensor-driven design would need as well.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..cache import keep_paid
from ..config import BatchSpec
from ..providers.base import ProviderError
from ..providers.batch_api import BatchAPI, BatchState
from ..stores import BatchRecord, Ledger
from .calls import CallPolicy, FatalProviderError, Progress, ProgressFn, RowFailure, error_class, error_message
from .stages import RowError, Stage, StageResult, group_identical

R = TypeVar("R")


@dataclass
class BatchJournal:
    """The ledger's batch records of one partition's stage, and where the waiting run reports."""

    ledger: Ledger
    partition_key: str
    stage: str
    spec: BatchSpec
    log: Callable[[str], None]

    def open(self) -> list[BatchRecord]:
        return self.ledger.open_batches(self.partition_key, self.stage)


def plan_batches(lines: list[list[int]], api: BatchAPI, sizes: Sequence[int], spec: BatchSpec) -> list[list[list[int]]]:
    """Request lines (row indices) grouped into batches within the provider's and the config's limits."""
    max_lines = min(api.max_lines, spec.max_requests)
    max_inputs = min(api.max_inputs, spec.max_inputs)
    max_bytes = min(api.max_bytes, int(spec.max_megabytes * 1_000_000))
    out: list[list[list[int]]] = []
    current: list[list[int]] = []
    inputs = size = 0
    for line in lines:
        line_size = sum(sizes[i] for i in line) * 11 // 10 + 400
        full = len(current) >= max_lines or inputs + len(line) > max_inputs or size + line_size > max_bytes
        if current and full:
            out.append(current)
            current, inputs, size = [], 0, 0
        current.append(line)
        inputs += len(line)
        size += line_size
    if current:
        out.append(current)
    return out


async def run_batch_stage(
    stage: Stage[R],
    texts: Sequence[str],
    *,
    batch_size: int,  # the realtime requests' size; a batch line holds one text
    policy: CallPolicy,
    progress: ProgressFn | None,
    progress_every: int,
) -> StageResult:
    """Run ``stage`` over ``texts`` through the provider's batch API (see the module's docstring)."""
    journal = policy.batches
    assert journal is not None
    provider = stage.provider
    api = provider.batch_api()
    n = len(texts)
    sent, _, truncated = provider.prepare(list(texts), exact=False)  # batch stages are not rate-paced
    provider.usage.truncated_inputs += truncated
    keys = [stage.key(t) for t in sent]
    tracker = Progress(n, progress, progress_every)
    settled = [False] * n
    failures: list[RowFailure] = []

    def settle(members: list[int]) -> None:
        for m in members:
            settled[m] = True
        tracker.add(len(members))

    cached = await policy.cache.get_many(sorted(set(keys)))
    hits = [i for i, key in enumerate(keys) if key in cached and stage.load(i, cached[key])]
    provider.usage.cache_hits += len(hits)
    settle(hits)
    groups = group_identical(keys, [i for i in range(n) if not settled[i]])

    records = await _resume(api, journal)
    waiting = {k for r in records for line in r.lines for k in line}
    # after a stop nothing new is submitted; batches already at the provider are still collected if done
    new = [] if policy.stop() else [members[0] for key, members in groups.items() if key not in waiting]
    if new:
        # one text per request line: a batch holds 50,000 inputs however they are grouped, and a line the API
        # refuses (one bad input) then fails one row, not its neighbours (realtime splits a refused request)
        lines = [[i] for i in new]
        sizes = [len(t.encode()) for t in sent]
        for chunk in plan_batches(lines, api, sizes, journal.spec):
            record = await _submit(
                api, journal, [[keys[i] for i in line] for line in chunk], [[sent[i] for i in line] for line in chunk]
            )
            if isinstance(record, ProviderError):  # the provider refused the batch: its rows fail with its words
                refused = [
                    RowFailure(m, record.kind, error_message(record))
                    for line in chunk
                    for i in line
                    for m in groups[keys[i]]
                ]
                settle([f.index for f in refused])
                failures.extend(await _record(policy, refused))
                continue
            records.append(record)

    async def collect(record: BatchRecord, state: BatchState) -> str:
        """Read a finished batch's answers into the stage, the cache and the failures; return a note."""
        line_texts = [[sent[groups[k][0]] if k in groups else "" for k in line] for line in record.lines]
        answers = await api.answers(record.batch_id or "", line_texts)
        provider.usage.requests += len(answers)
        provider.usage.inputs += sum(len(record.lines[i]) for i in answers)
        fresh: dict[str, bytes] = {}
        paid: list[RowFailure] = []

        def unsettled(key: str) -> list[int]:
            return [m for m in groups.get(key, []) if not settled[m]]

        def fail(members: list[int], kind: str, message: str) -> None:
            paid.extend(RowFailure(m, kind, message) for m in members)
            settle(members)

        for number, line in enumerate(record.lines):
            if number not in answers:
                continue  # unanswered (expired, cancelled): re-queued, the next run submits it again
            answer = answers[number]
            try:
                if isinstance(answer, ProviderError):
                    raise answer
                results = stage.read(answer, len(line))
            except FatalProviderError:
                raise
            except Exception as exc:  # noqa: BLE001 - every row of the line fails with the provider's words
                for key in line:
                    fail(unsettled(key), error_class(exc), error_message(exc))
                continue
            for key, result in zip(line, results, strict=True):
                if isinstance(result, RowError):
                    fail(unsettled(key), result.error_class, result.message)
                    continue
                fresh[key] = stage.encode(result)  # paid for: kept even for rows this run no longer has
                members = unsettled(key)
                if members:
                    stage.keep(members, result)
                    settle(members)
        await keep_paid(policy.cache, fresh)
        failures.extend(await _record(policy, paid))
        missing = len(record.lines) - len(answers)
        note = f"{state.status}: {len(answers)} of {len(record.lines)} request lines answered"
        if missing:
            note += f", {missing} unanswered and re-queued for the next run"
        return note

    pending = [r for r in records if r.batch_id]
    started = time.monotonic()
    deadline = started + journal.spec.wait_minutes * 60
    last_seen: tuple = ()
    last_logged = 0.0
    while pending:
        states = {r.label: await api.state(r.batch_id or "") for r in pending}
        for record in list(pending):
            state = states[record.label]
            if state.finished:
                note = await collect(record, state)
                await asyncio.to_thread(journal.ledger.batch_done, record.label, note)
                journal.log(f"{journal.stage} batch {record.batch_id}: {note}")
                pending.remove(record)
        if not pending:
            break
        seen = tuple(states[r.label] for r in pending)
        if seen != last_seen or time.monotonic() - last_logged >= 300:  # when something changed; every 5 min
            journal.log(_waiting_line(journal, states, pending, time.monotonic() - started))
            last_seen, last_logged = seen, time.monotonic()
        if policy.stop() or time.monotonic() >= deadline:
            why = "a stop was requested" if policy.stop() else f"waited {journal.spec.wait_minutes:g} min"
            journal.log(
                f"{journal.stage}: {why}; {_batches(len(pending))} still running at the provider, resumed by the next "
                "run of this partition (nothing is submitted twice)"
            )
            break
        await _sleep(min(journal.spec.poll_seconds, max(deadline - time.monotonic(), 0.01)), policy)
    unsent = [i for i in range(n) if not settled[i]]
    return StageResult(sorted(failures, key=lambda f: f.index), unsent)


def _waiting_line(
    journal: BatchJournal, states: dict[str, BatchState], pending: list[BatchRecord], waited: float
) -> str:
    parts = []
    for record in pending:
        s = states[record.label]
        counts = f" {s.completed or 0}/{s.total} done, {s.failed or 0} failed" if s.total is not None else ""
        parts.append(f"{record.batch_id} {s.status}{counts}")
    return (
        f"{journal.stage}: waiting for {_batches(len(pending))} ({'; '.join(parts)}), {waited:.0f}s elapsed "
        f"of up to {journal.spec.wait_minutes:g} min"
    )


def _batches(n: int) -> str:
    return f"{n} batch" if n == 1 else f"{n} batches"


async def _sleep(seconds: float, policy: CallPolicy) -> None:
    """Sleep, waking early for a stop."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and not policy.stop():
        await asyncio.sleep(min(0.2, end - time.monotonic()))


async def _resume(api: BatchAPI, journal: BatchJournal) -> list[BatchRecord]:
    """The open batches; those a killed run recorded without an id are found at the provider by label, or
    closed when they never reached it (their rows are then submitted again)."""
    records = await asyncio.to_thread(journal.open)
    out = []
    for record in records:
        if record.batch_id:
            journal.log(f"{journal.stage}: resuming batch {record.batch_id} (submitted by an earlier run)")
            out.append(record)
            continue
        found = await api.find(record.label)
        if found is None:
            await asyncio.to_thread(journal.ledger.batch_done, record.label, "never reached the provider")
            continue
        await asyncio.to_thread(journal.ledger.batch_submitted, record.label, found)
        journal.log(f"{journal.stage}: found batch {found} that an earlier run submitted without recording it")
        out.append(BatchRecord(record.label, record.partition_key, record.stage, found, "submitted", record.lines))
    return out


async def _submit(
    api: BatchAPI, journal: BatchJournal, lines: list[list[str]], texts: list[list[str]]
) -> BatchRecord | ProviderError:
    """Record the batch, then submit it, then record its id: a run killed at any point resumes it."""
    label = f"backfill-{uuid.uuid4().hex[:20]}"
    record = BatchRecord(label, journal.partition_key, journal.stage, None, "submitting", lines)
    await asyncio.to_thread(journal.ledger.batch_intent, record)
    try:
        batch_id = await api.submit(texts, label)
    except ProviderError as exc:
        if exc.kind == "fatal":
            raise FatalProviderError(error_message(exc)) from None
        if exc.kind in ("transient", "rate_limit"):
            raise  # the step fails and is retried; the next attempt finds the batch by label or submits it
        await asyncio.to_thread(journal.ledger.batch_done, label, f"refused: {error_message(exc)}")
        return exc
    await asyncio.to_thread(journal.ledger.batch_submitted, label, batch_id)
    journal.log(f"{journal.stage}: submitted batch {batch_id}: {len(lines)} requests, {sum(map(len, lines))} texts")
    return BatchRecord(label, journal.partition_key, journal.stage, batch_id, "submitted", lines)


async def _record(policy: CallPolicy, failed: list[RowFailure]) -> list[RowFailure]:
    """Paid answers that cannot be used are recorded as they come (as realtime ones are): marked so."""
    if not failed or policy.record_failures is None:
        return failed
    try:
        await policy.record_failures(failed)
    except Exception:  # noqa: BLE001 - the step records them when it ends
        return failed
    return [dataclasses.replace(f, recorded=True) for f in failed]
