"""What each asset does, as plain typed functions: testable without Dagster, called by thin wrappers.

Each step returns its table (if any) and its metadata as plain values. Errors that retrying cannot fix
(a table that does not fit the config, a missing key, an unknown model) are raised as they are; the
Dagster layer turns them into failures without retry.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from . import stopping
from .config import DatasetConfig, ProviderSpec
from .detection import Reason, apply_limit, detect, reason_counts
from .engine import CallPolicy, RowFailure, embed_texts, enrich_texts
from .engine.batch_stage import BatchJournal
from .leases import Lease, held_message
from .partitions import partition_spec
from .policy import build_policy
from .providers.base import EmbeddingProvider, EnrichmentProvider, Usage
from .reporting import Log, accounting_line, partition_summary, progress_logger, timing, usage_metadata
from .results import (
    embedding_texts,
    embeddings_schema,
    embeddings_table,
    enrichment_schema,
    enrichment_table,
    hold_back_failed_enrichment,
    id_type_of,
    merge_results,
    row_failures,
    stage_failures,
)
from .stores import Failure, SchemaError, Store

T = TypeVar("T")
P = TypeVar("P", EmbeddingProvider, EnrichmentProvider)


@dataclass
class StepResult:
    table: pa.Table | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # plain values: ints, floats, strings, dicts


def _skipped(lease: Lease, holder: str, log: Log, table: pa.Table | None, **extra: object) -> StepResult:
    """A step's result when another live run holds the partition: it says so, and does nothing."""
    message = held_message(lease.key, holder)
    log.warning(message)
    return StepResult(table, {"rows_in": 0, "outcome": "skipped", "skipped": message, "held_by_run": holder, **extra})


def check_unique_ids(raw: pa.Table, id_column: str, key: str, dataset: str) -> None:
    """Results are written by id: an id naming two rows would give both one row's results. Found before
    anything is paid for."""
    counts = pc.value_counts(raw.column("id"))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        example = repeated[0]
        raise SchemaError(
            f"dataset '{dataset}': id column {id_column} is not unique: id {example['values']} appears "
            f"{example['counts']} times in partition {key} ({len(repeated)} ids repeat); results are written by id, "
            "so each id must name one row (use a unique column as id_column)"
        )


def read_rows(store: Store, dataset: DatasetConfig, lease: Lease, log: Log, *, migrate: bool = False) -> StepResult:
    """Take the partition's lease and read its rows; a partition held by a live run is skipped."""
    started = time.monotonic()
    if migrate:
        added = store.migrate()
        log.info(f"migration added: {', '.join(added) or 'nothing (schema up to date)'}")
    store.check_schema()
    part = partition_spec(lease.key, dataset, store.rows)
    with lease.held() as holder:
        if holder is not None:
            return _skipped(lease, holder, log, store.rows.raw_schema().empty_table())
        table = store.rows.read_partition(part, dataset.read_batch_size)
        check_unique_ids(table, dataset.id_column, lease.key, store.layout.dataset)
    log.info(f"read {table.num_rows} rows of partition {part.key}")
    return StepResult(table, {"rows_in": table.num_rows, "outcome": "read", **timing(started, table.num_rows)})


def detect_rows(
    store: Store | None,
    dataset: DatasetConfig,
    raw: pa.Table,
    log: Log,
    *,
    force: bool = False,
    requeue_failed: bool = False,
    limit: int | None = None,
) -> StepResult:
    """Classify every row; ``store`` (for failures cooling down) may be None when ``force`` is set."""
    started = time.monotonic()
    cooling: set[object] = set()
    if not force and store is not None:
        ids = raw.column("id").to_pylist()
        if requeue_failed:
            log.info(f"re-queued {store.ledger.requeue_failures(ids)} failed rows")
        cooling = store.ledger.cooling_down_ids(ids, dataset.failure_cooldown_hours)
    detected = detect(raw, dataset, force=force, cooling_ids=cooling)
    if limit:
        detected = apply_limit(detected, limit)
    counts = reason_counts(detected)
    log.info(f"detection: {json.dumps(counts, sort_keys=True)}")
    return StepResult(
        detected,
        {
            "rows_in": detected.num_rows,
            "rows_needing_embedding": pc.sum(detected.column("needs_embedding")).as_py() or 0,
            "rows_needing_enrichment": pc.sum(detected.column("needs_enrichment")).as_py() or 0,
            "reasons": counts,
            **{f"rows_{r.value}": counts.get(r.value, 0) for r in Reason},
            **timing(started, detected.num_rows),
        },
    )


def call_provider(
    lease: Lease,
    dataset: DatasetConfig,
    spec: ProviderSpec,
    stage: str,
    make_provider: Callable[[], P],
    work: Callable[[P, CallPolicy], Awaitable[T]],
    log: Log,
    ids: list[object],
) -> tuple[T, Usage] | str:
    """Holding the partition's lease, check the provider with a free call, run the engine under the dataset's
    policy and log the accounting; return the live holder's run id instead when another run has the lease."""
    with lease.held() as holder, lease.open_store() as store:
        if holder is not None:
            return holder
        provider = make_provider()
        policy = build_policy(dataset, spec, store.ledger, getattr(spec, "expected_output_tokens", 0))
        policy.stop, policy.stop_grace_seconds = stopping.requested, dataset.stop_grace_seconds
        failure_stage = "embedding" if stage == "embeddings" else stage

        one_at_a_time = asyncio.Lock()  # the store's connection takes one transaction at a time

        async def record_now(failed: list[RowFailure]) -> None:
            found = [Failure(ids[f.index], failure_stage, f.error_class, f.message) for f in failed]
            async with one_at_a_time:
                await asyncio.to_thread(store.ledger.record_failures, found)

        policy.record_failures = record_now
        if spec.mode == "batch":
            policy.batches = BatchJournal(store.ledger, lease.key, failure_stage, spec.batch, log.info)

        async def go() -> T:
            try:
                note = await provider.preflight()
                if note:
                    log.info(f"{stage}: {note}")
                return await work(provider, policy)
            finally:
                await provider.aclose()
                await policy.cache.aclose()

        outcome = asyncio.run(go())
    log.info(accounting_line(stage, provider.usage, spec))
    return outcome, provider.usage


def enrich_rows(
    lease: Lease,
    dataset: DatasetConfig,
    detected: pa.Table,
    provider: Callable[[], EnrichmentProvider],
    log: Log,
) -> StepResult:
    """Skills, seniority and a summary for the rows that need them; per-row failures are kept as rows."""
    started = time.monotonic()
    todo = detected.filter(pc.field("needs_enrichment"))
    if not dataset.enrichment.enabled or todo.num_rows == 0:
        why = "enrichment disabled for this dataset" if not dataset.enrichment.enabled else "no row needs it"
        log.info(f"enrichment skipped: {why}")
        return StepResult(
            enrichment_schema(dataset, id_type_of(detected)).empty_table(),
            {"rows_in": 0, "skipped": why, **usage_metadata(Usage())},
        )
    spec = dataset.enrichment
    texts = todo.column("text").to_pylist()
    called = call_provider(
        lease,
        dataset,
        spec,
        "enrichment",
        provider,
        lambda p, policy: enrich_texts(
            p, texts, batch_size=spec.batch_size, policy=policy, progress=progress_logger(log, "enrichment")
        ),
        log,
        todo.column("id").to_pylist(),
    )
    if isinstance(called, str):
        return _skipped(
            lease,
            called,
            log,
            enrichment_schema(dataset, id_type_of(detected)).empty_table(),
            **usage_metadata(Usage()),
        )
    outcome, usage = called
    table = enrichment_table(dataset, todo, outcome)
    _record_failures(lease, "enrichment", table, log, _recorded(todo, outcome.failures))
    failed = len(outcome.failures)
    stopped = _write_if_stopped(
        lease, dataset, detected, table, embeddings_schema(dataset, id_type_of(detected)).empty_table(), log
    )
    return StepResult(
        table,
        {
            "rows_in": todo.num_rows,
            "rows_enriched": todo.num_rows - failed - len(outcome.unsent),
            "rows_failed": failed,
            "rows_unsent": len(outcome.unsent),
            **stopped,
            **usage_metadata(usage, spec),
            **timing(started, todo.num_rows),
        },
    )


def embed_rows(
    lease: Lease,
    dataset: DatasetConfig,
    detected: pa.Table,
    enrichment: pa.Table,
    provider: Callable[[], EmbeddingProvider],
    log: Log,
) -> StepResult:
    """Vectors for the rows that need them, in batches; per-row failures are kept as rows."""
    started = time.monotonic()
    todo = detected.filter(pc.field("needs_embedding"))
    held_back = 0
    if dataset.embedding.include_enrichment:
        todo, held_back = hold_back_failed_enrichment(todo, enrichment)
    if todo.num_rows == 0:
        log.info("embeddings skipped: no row needs one")
        return StepResult(
            embeddings_schema(dataset, id_type_of(detected)).empty_table(),
            {"rows_in": 0, "rows_held_back": held_back, **usage_metadata(Usage())},
        )
    spec = dataset.embedding
    texts = embedding_texts(dataset, todo, enrichment)
    called = call_provider(
        lease,
        dataset,
        spec,
        "embeddings",
        provider,
        lambda p, policy: embed_texts(
            p, texts, batch_size=spec.batch_size, policy=policy, progress=progress_logger(log, "embeddings")
        ),
        log,
        todo.column("id").to_pylist(),
    )
    if isinstance(called, str):
        return _skipped(
            lease,
            called,
            log,
            embeddings_schema(dataset, id_type_of(detected)).empty_table(),
            **usage_metadata(Usage()),
        )
    outcome, usage = called
    table = embeddings_table(dataset, todo, outcome)
    _record_failures(lease, "embedding", table, log, _recorded(todo, outcome.failures))
    stopped = _write_if_stopped(lease, dataset, detected, enrichment, table, log)
    return StepResult(
        table,
        {
            "rows_in": todo.num_rows,
            "rows_embedded": int(outcome.ok.sum()),
            "rows_failed": len(outcome.failures),
            "rows_unsent": len(outcome.unsent),
            **stopped,
            "rows_held_back": held_back,
            **usage_metadata(usage, spec),
            **timing(started, todo.num_rows),
        },
    )


def _write_if_stopped(
    lease: Lease, dataset: DatasetConfig, detected: pa.Table, enrichment: pa.Table, embeddings: pa.Table, log: Log
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


def _not_yet_recorded(store: Store, failures: list[Failure]) -> list[Failure]:
    """The provider steps record their failures when they end; those they could not (the database was
    away), and unreadable texts, are recorded with the write."""
    recent = store.ledger.failed_since(1.0) if any(f.stage != "read" for f in failures) else set()
    return [f for f in failures if f.stage == "read" or str(f.row_id) not in recent]


def _recorded(todo: pa.Table, failures: list[RowFailure]) -> set[object]:
    ids = todo.column("id").to_pylist()
    return {ids[f.index] for f in failures if f.recorded}


def _record_failures(lease: Lease, stage: str, table: pa.Table, log: Log, recorded: set[object]) -> None:
    """Record a stage's failed rows as soon as it ends, not at the write: an answer that failed validation
    was paid for and is not cached, so a run killed before its write must not ask for it again."""
    failed = stage_failures(stage, table)
    for f in failed:
        log.warning(f"{stage} failed for row id {f.row_id}: [{f.error_class}] {f.message}")
    failed = [f for f in failed if f.row_id not in recorded]  # the engine recorded paid ones as they came
    if not failed:
        return
    try:
        with lease.open_store() as store:
            store.ledger.record_failures(failed)
    except Exception as exc:  # noqa: BLE001 - failing the step now would pay for its rows again; the write records them
        log.warning(f"could not record {len(failed)} {stage} failures yet ({exc}); the write step will")


def remove_orphans(store: Store, dataset: DatasetConfig, key: str, log: Log) -> int:
    """With a separate results table, delete the partition's results whose source row is gone or no longer
    passes the row filter (``target.remove_orphans``)."""
    if dataset.target.mode != "table" or not dataset.target.remove_orphans:
        return 0
    deleted = store.rows.delete_orphans(partition_spec(key, dataset, store.rows))
    if deleted:
        log.info(f"deleted {deleted} rows of {store.layout.target} whose source row is gone or filtered out")
    return deleted


def write_rows(
    store: Store,
    dataset: DatasetConfig,
    lease: Lease,
    detected: pa.Table,
    enrichment: pa.Table,
    embeddings: pa.Table,
    log: Log,
) -> StepResult:
    """Write the results, record failures, clear the failures of rows that succeeded, release the lease."""
    started = time.monotonic()
    results = merge_results(dataset, enrichment, embeddings)
    failures = row_failures(detected, enrichment, embeddings)
    failed = {f.row_id for f in failures}
    succeeded = [i for i in results.column("id").to_pylist() if i not in failed]
    with lease.held() as holder:
        if holder is not None:
            return _skipped(lease, holder, log, None, rows_written=0)
        stats = store.rows.write_results(results, dataset.write_batch_size)
        rejected = [Failure(row_id, "write", "rejected_by_database", message) for row_id, message in stats.rejected]
        for failure in rejected:
            log.warning(f"write failed for row id {failure.row_id}: {failure.message}")
        store.ledger.record_failures(_not_yet_recorded(store, failures) + rejected)
        store.ledger.clear_failures(sorted(set(succeeded) - {f.row_id for f in rejected}, key=str))
        deleted = remove_orphans(store, dataset, lease.key, log)
    lease.release()
    counts = reason_counts(detected)
    by_stage = {stage: sum(1 for f in failures if f.stage == stage) for stage in ("enrichment", "embedding")}
    summary = partition_summary(lease.key, detected.num_rows, stats.rows_written, counts, by_stage)
    log.info(summary)
    return StepResult(
        None,
        {
            "rows_in": detected.num_rows,
            "outcome": "written",
            "rows_written": stats.rows_written,
            "write_batches": stats.batches,
            "rows_up_to_date": counts.get(Reason.OK.value, 0),
            "rows_skipped_no_text": counts.get(Reason.NO_TEXT.value, 0),
            "rows_cooling_down": counts.get(Reason.COOLING_DOWN.value, 0),
            "rows_deferred": counts.get(Reason.DEFERRED.value, 0),
            "rows_enrichment_failed": by_stage["enrichment"],
            "rows_embedding_failed": by_stage["embedding"],
            "rows_write_rejected": len(stats.rejected),
            "rows_deleted": deleted,
            "summary": summary,
            **timing(started, stats.rows_written),
        },
    )
