"""The two paid steps, enrichment and embeddings, as plain functions called by thin asset wrappers.

The rows needing work stream from the detection's spool in windows of ``rows_in_memory`` rows; each
window goes through the engine (cache, dedupe, batches, rate budget) and its results are appended to the
step's output spool, so memory holds one window's texts and answers whatever the partition's width. Texts
repeated across windows are paid for once through the paid-results cache. In batch mode the partition is
one window: its batches are submitted, and resumed, as a whole.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from . import head_start, start_gate, stopping
from .config import DatasetConfig, ProviderSpec
from .embed_ahead import EmbeddingsAhead, embeddings_ahead, embeds_ahead
from .engine import CallPolicy, RowFailure, embed_texts, enrich_texts
from .engine.batch_stage import BatchJournal
from .leases import Lease
from .policy import build_policy, failure_recorder
from .providers.base import EmbeddingProvider, EnrichmentProvider, Usage
from .reporting import Log, accounting_line, progress_logger, timing, usage_metadata
from .results import (
    embedding_texts,
    embeddings_schema,
    embeddings_table,
    enrichment_schema,
    enrichment_table,
    failed_ids,
    id_type_of,
    stage_failures,
)
from .rows import enrichment_col
from .spool import Spool, SpoolWriter, as_spool, count_true, release_memory, rows_where, spool_of
from .steps import StepResult, skipped, write_rows
from .stores import Store

P = TypeVar("P", EmbeddingProvider, EnrichmentProvider)


@dataclass
class Window:
    """One window's output: its table, its failed rows (indexes into the window) and rows a stop left unsent."""

    table: pa.Table
    failures: list[RowFailure]
    unsent: int


@dataclass
class Windows(Generic[P]):
    """What a paid step runs: the windows of rows needing work and how one window is worked."""

    stage: str  # "enrichment" or "embeddings"
    spec: ProviderSpec
    total: int
    todo: Iterator[pa.Table]
    work: Callable[[P, CallPolicy, pa.Table, Callable[[int, int], None]], Awaitable[Window]]
    schema: pa.Schema
    failed: int = 0
    unsent: int = 0
    recorded: set[object] = field(default_factory=set)
    ahead: Callable[[Store], EmbeddingsAhead] | None = None  # embeddings sent alongside (enrichment only)
    ahead_metadata: dict[str, object] = field(default_factory=dict)


RANK_SECONDS = 2.0  # how often a run looks at the live runs of earlier partitions


def window_rows(dataset: DatasetConfig, spec: ProviderSpec, total: int) -> int:
    return max(total, 1) if spec.mode == "batch" else dataset.rows_in_memory


def run_windows(
    lease: Lease, dataset: DatasetConfig, run: Windows[P], make_provider: Callable[[], P], log: Log
) -> tuple[Spool, Usage] | str:
    """Holding the partition's lease, check the provider with a free call, then work the windows in turn
    under the dataset's policy, appending each window's table to the output; return the live holder's run
    id instead when another run has the lease."""
    failure_stage = "embedding" if run.stage == "embeddings" else run.stage
    with lease.held() as holder, lease.open_store() as store:
        if holder is not None:
            return holder
        provider = make_provider()
        expected = getattr(run.spec, "expected_output_tokens", 0)
        policy = build_policy(dataset, run.spec, store.ledger, expected, stop=stopping.requested)
        one_at_a_time = asyncio.Lock()  # the store's connection takes one transaction at a time
        ids: list[object] = []  # the current window's ids, for failures recorded as they come
        policy.record_failures = failure_recorder(store.ledger, ids, failure_stage, one_at_a_time)
        if run.spec.mode == "batch":
            policy.batches = BatchJournal(store.ledger, lease.key, failure_stage, run.spec.batch, log.info)
        writer = SpoolWriter(run.schema)
        report = progress_logger(log, run.stage)

        async def follow_rank() -> None:
            """Earlier partitions first (see ``RateLimiter.set_rank``): this run's rank among the live ones."""
            while True:
                async with one_at_a_time:
                    rank = await asyncio.to_thread(store.ledger.live_leases_before, lease.key, lease.seconds)
                policy.limiter.set_rank(rank, policy.max_in_flight)
                await asyncio.sleep(RANK_SECONDS)

        ahead = run.ahead(store) if run.ahead is not None else None

        async def go() -> None:
            ranking = (
                asyncio.create_task(follow_rank()) if policy.limiter.enabled and run.spec.mode != "batch" else None
            )
            try:
                note = await provider.preflight()
                if note:
                    log.info(f"{run.stage}: {note}")
                done = 0
                for todo in run.todo:  # after a stop, each window still takes its answers already paid for
                    ids[:] = todo.column("id").to_pylist()
                    progress = functools.partial(_shifted, report, done, run.total)
                    alongside = asyncio.ensure_future(ahead.window(todo)) if ahead is not None else None
                    window = await run.work(provider, policy, todo, progress)
                    if alongside is not None:
                        await alongside
                    done += todo.num_rows
                    writer.write(window.table)
                    run.failed += len(window.failures)
                    run.unsent += window.unsent
                    run.recorded |= {ids[f.index] for f in window.failures if f.recorded}
                    async with one_at_a_time:
                        await asyncio.to_thread(_record_failures, store, failure_stage, window.table, log, run.recorded)
                    del window  # its vectors: not held while the next window is worked
                    release_memory()
            finally:
                if ranking is not None:
                    ranking.cancel()
                await provider.aclose()
                await policy.cache.aclose()
                if ahead is not None:
                    await ahead.aclose()
                    run.ahead_metadata = ahead.metadata()

        start_gate.started()  # the run's start-up is over: the next partition's may begin
        head_start.taken_over()  # and the CLI's head start hands its texts to the runs
        try:
            asyncio.run(go())
        except BaseException:
            writer.abandon()
            raise
    log.info(accounting_line(run.stage, provider.usage, run.spec))
    return writer.finish(), provider.usage


def _shifted(report: Callable[[int, int], None], offset: int, total: int, done: int, _window: int) -> None:
    """A window's progress as the step's: rows done before it plus its own, of the step's total."""
    report(offset + done, total)


def enrich_rows(
    lease: Lease,
    dataset: DatasetConfig,
    detected: pa.Table | Spool,
    provider: Callable[[], EnrichmentProvider],
    log: Log,
    embedding_provider: Callable[[], EmbeddingProvider] | None = None,
) -> StepResult:
    """Skills, seniority and a summary for the rows that need them; per-row failures are kept as rows.
    Given the ``embedding_provider``, the rows' embeddings go ahead alongside where they can (see
    :mod:`.embed_ahead`)."""
    started = time.monotonic()
    detected = as_spool(detected)
    schema = enrichment_schema(dataset, id_type_of(detected))
    total = count_true(detected, "needs_enrichment") if dataset.enrichment.enabled else 0
    if total == 0:
        why = "enrichment disabled for this dataset" if not dataset.enrichment.enabled else "no row needs it"
        log.info(f"enrichment skipped: {why}")
        return StepResult(spool_of(schema.empty_table()), {"rows_in": 0, "skipped": why, **usage_metadata(Usage())})
    spec = dataset.enrichment

    async def work(p: EnrichmentProvider, policy: CallPolicy, todo: pa.Table, progress: Callable) -> Window:
        texts = todo.column("text").to_pylist()
        outcome = await enrich_texts(p, texts, batch_size=spec.batch_size, policy=policy, progress=progress)
        return Window(enrichment_table(dataset, todo, outcome), outcome.failures, len(outcome.unsent))

    rows = window_rows(dataset, spec, total)
    make = embedding_provider if embeds_ahead(dataset) else None
    columns = ["id", "content_hash", "text", *(["needs_embedding"] if make is not None else [])]
    run: Windows[EnrichmentProvider] = Windows(
        "enrichment", spec, total, rows_where(detected, "needs_enrichment", rows, columns), work, schema
    )
    if make is not None:
        run.ahead = lambda store: embeddings_ahead(dataset, make(), store.ledger, stopping.requested, log)
    called = run_windows(lease, dataset, run, provider, log)
    if isinstance(called, str):
        return skipped(lease, called, log, spool_of(schema.empty_table()), **usage_metadata(Usage()))
    table, usage = called
    empty = spool_of(embeddings_schema(dataset, id_type_of(detected)).empty_table())
    stopped = _write_if_stopped(lease, dataset, detected, table, empty, log)
    return StepResult(table, _metadata(run, usage, started, "rows_enriched", **stopped, **run.ahead_metadata))


def embed_rows(
    lease: Lease,
    dataset: DatasetConfig,
    detected: pa.Table | Spool,
    enrichment: pa.Table | Spool,
    provider: Callable[[], EmbeddingProvider],
    log: Log,
) -> StepResult:
    """Vectors for the rows that need them, in batches; per-row failures are kept as rows. With
    ``include_enrichment``, a row whose enrichment just failed is held back (its text would lack it)."""
    started = time.monotonic()
    detected, enrichment = as_spool(detected), as_spool(enrichment)
    schema = embeddings_schema(dataset, id_type_of(detected))
    fresh = _fresh_enrichment(dataset, enrichment)
    failed_before = failed_ids(fresh) if fresh.num_rows else pa.array([], id_type_of(detected))
    columns = ["id", "content_hash", "text", *_stored_enrichment(dataset, detected)]
    held_back = _count_held_back(detected, failed_before) if len(failed_before) else 0
    total = count_true(detected, "needs_embedding") - held_back
    if total == 0:
        log.info("embeddings skipped: no row needs one")
        metadata = {"rows_in": 0, "rows_held_back": held_back, **usage_metadata(Usage())}
        return StepResult(spool_of(schema.empty_table()), metadata)
    spec = dataset.embedding
    rows = window_rows(dataset, spec, total)

    async def work(p: EmbeddingProvider, policy: CallPolicy, todo: pa.Table, progress: Callable) -> Window:
        texts = embedding_texts(dataset, todo, fresh)
        outcome = await embed_texts(p, texts, batch_size=spec.batch_size, policy=policy, progress=progress)
        return Window(embeddings_table(dataset, todo, outcome), outcome.failures, len(outcome.unsent))

    def todo() -> Iterator[pa.Table]:
        for rows_needing in rows_where(detected, "needs_embedding", rows, columns):
            kept = rows_needing.filter(pc.invert(pc.is_in(rows_needing.column("id"), value_set=failed_before)))
            if kept.num_rows:
                yield kept

    run: Windows[EmbeddingProvider] = Windows("embeddings", spec, total, todo(), work, schema)
    called = run_windows(lease, dataset, run, provider, log)
    if isinstance(called, str):
        return skipped(lease, called, log, spool_of(schema.empty_table()), **usage_metadata(Usage()))
    table, usage = called
    stopped = _write_if_stopped(lease, dataset, detected, enrichment, table, log)
    return StepResult(table, _metadata(run, usage, started, "rows_embedded", **stopped, rows_held_back=held_back))


def _metadata(run: Windows, usage: Usage, started: float, done: str, **extra: object) -> dict[str, object]:
    """A paid step's metadata: rows in, done, failed and left unsent by a stop; what it asked and paid."""
    return {
        "rows_in": run.total,
        done: run.total - run.failed - run.unsent,
        "rows_failed": run.failed,
        "rows_unsent": run.unsent,
        **extra,
        **usage_metadata(usage, run.spec),
        **timing(started, run.total),
    }


def _fresh_enrichment(dataset: DatasetConfig, enrichment: Spool) -> pa.Table:
    """The columns of this run's enrichment the embedding step reads: ids, errors, and with
    ``include_enrichment`` the summary and skills (text, far smaller than the vectors)."""
    if not dataset.embedding.include_enrichment:
        return enrichment.read(["id", "error"]).slice(0, 0)
    wanted = ["id", "error"] + [enrichment_col(f) for f in ("summary", "skills")]
    return enrichment.read([name for name in wanted if name in enrichment.column_names])


def _stored_enrichment(dataset: DatasetConfig, detected: Spool) -> list[str]:
    names = [enrichment_col(f) for f in ("summary", "skills")]
    return [n for n in names if n in detected.column_names] if dataset.embedding.include_enrichment else []


def _count_held_back(detected: Spool, failed: pa.Array) -> int:
    table = detected.read(["id", "needs_embedding"])
    held = pc.and_(table.column("needs_embedding"), pc.is_in(table.column("id"), value_set=failed))
    return int(pc.sum(held).as_py() or 0)


def _write_if_stopped(
    lease: Lease, dataset: DatasetConfig, detected: Spool, enrichment: Spool, embeddings: Spool, log: Log
) -> dict[str, object]:
    """After a graceful stop, the run ends with this step: write what is done now, so no paid answer waits
    for a later run, and release the partition."""
    if not stopping.requested():
        return {}
    with lease.open_store() as store:
        written = write_rows(store, dataset, lease, detected, enrichment, embeddings, log)
    rows = written.metadata.get("rows_written", 0)
    stopping.record_written(rows)
    log.warning(f"partition {lease.key}: stopped by {stopping.reason()}; {rows} completed rows written")
    return {"outcome": "stopped", "rows_written": rows, "stopped_by": stopping.reason()}


def _record_failures(store: Store, stage: str, table: pa.Table, log: Log, recorded: set[object]) -> None:
    """Record a window's failed rows as soon as it ends, not at the write: an answer that failed validation
    was paid for and is not cached, so a run killed before its write must not ask for it again."""
    failed = stage_failures(stage, table)
    for f in failed:
        log.warning(f"{stage} failed for row id {f.row_id}: [{f.error_class}] {f.message}")
    failed = [f for f in failed if f.row_id not in recorded]  # the engine recorded paid ones as they came
    if not failed:
        return
    try:
        store.ledger.record_failures(failed)
    except Exception as exc:  # noqa: BLE001 - failing the step now would pay for its rows again; the write records them
        log.warning(f"could not record {len(failed)} {stage} failures yet ({exc}); the write step will")
