"""What each asset does, as plain typed functions: testable without Dagster, called by thin wrappers.

Each step returns its table (if any) and its metadata as plain values. Errors that retrying cannot fix
(a table that does not fit the config, a missing key, an unknown model) are raised as they are; the
Dagster layer turns them into failures without retry.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .config import DatasetConfig
from .detection import Reason, apply_limit, detect, reason_counts
from .leases import Lease, held_message
from .partitions import partition_spec
from .reporting import Log, partition_summary, timing
from .results import merge_results, stage_failures, unreadable_failures
from .rows import TEXT_ERROR
from .spool import Spool, SpoolWriter, as_spool, release_memory, spool_of
from .stores import Failure, SchemaError, Store
from .stores.base import WriteStats


@dataclass
class StepResult:
    table: Spool | None = None  # None for the write, which has no table
    metadata: dict[str, Any] = field(default_factory=dict)  # plain values: ints, floats, strings, dicts


def skipped(lease: Lease, holder: str, log: Log, table: Spool | None, **extra: object) -> StepResult:
    """A step's result when another live run holds the partition: it says so, and does nothing."""
    message = held_message(lease.key, holder)
    log.warning(message)
    return StepResult(table, {"rows_in": 0, "outcome": "skipped", "skipped": message, "held_by_run": holder, **extra})


def check_unique_ids(ids: pa.ChunkedArray | pa.Array, id_column: str, key: str, dataset: str) -> None:
    """Results are written by id: an id naming two rows would give both one row's results. Found before
    anything is paid for."""
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        example = repeated[0]
        raise SchemaError(
            f"dataset '{dataset}': id column {id_column} is not unique: id {example['values']} appears "
            f"{example['counts']} times in partition {key} ({len(repeated)} ids repeat); results are written by id, "
            "so each id must name one row (use a unique column as id_column)"
        )


def read_rows(store: Store, dataset: DatasetConfig, lease: Lease, log: Log, *, migrate: bool = False) -> StepResult:
    """Take the partition's lease and stream its rows to a spool; a partition held by a live run is skipped."""
    started = time.monotonic()
    if migrate:
        added = store.migrate()
        log.info(f"migration added: {', '.join(added) or 'nothing (schema up to date)'}")
    store.check_schema()
    part = partition_spec(lease.key, dataset, store.rows)
    with lease.held() as holder:
        if holder is not None:
            return skipped(lease, holder, log, spool_of(store.rows.raw_schema().empty_table()))
        writer = SpoolWriter(store.rows.raw_schema())
        try:
            for batch in store.rows.read_batches(part, dataset.read_batch_size):
                writer.write(pa.Table.from_batches([batch]))
        except BaseException:
            writer.abandon()
            raise
        table = writer.finish()
        check_unique_ids(table.column("id"), dataset.id_column, lease.key, store.layout.dataset)
    log.info(f"read {table.num_rows} rows of partition {part.key}")
    return StepResult(table, {"rows_in": table.num_rows, "outcome": "read", **timing(started, table.num_rows)})


def detect_rows(
    store: Store | None,
    dataset: DatasetConfig,
    raw: pa.Table | Spool,
    log: Log,
    *,
    force: bool = False,
    requeue_failed: bool = False,
    limit: int | None = None,
) -> StepResult:
    """Classify every row, ``rows_in_memory`` at a time; ``store`` (for failures cooling down) may be None
    when ``force`` is set."""
    started = time.monotonic()
    raw = as_spool(raw)
    counts: Counter[str] = Counter()
    needing = {"needs_embedding": 0, "needs_enrichment": 0}
    left = limit
    writer: SpoolWriter | None = None
    requeued = 0
    for batch in raw.batches(dataset.rows_in_memory):
        if requeue_failed and not force and store is not None:
            requeued += store.ledger.requeue_failures(batch.column("id").to_pylist())
        detected, left = classify(store, dataset, batch, force=force, left=left)
        counts.update(reason_counts(detected))
        for column in needing:
            needing[column] += pc.sum(detected.column(column)).as_py() or 0
        writer = writer or SpoolWriter(detected.schema)
        writer.write(detected)
    if requeue_failed and not force:
        log.info(f"re-queued {requeued} failed rows")
    out = writer.finish() if writer else spool_of(detect(raw.read(), dataset, force=force))  # an empty partition
    log.info(f"detection: {json.dumps(dict(counts), sort_keys=True)}")
    return StepResult(
        out,
        {
            "rows_in": out.num_rows,
            "rows_needing_embedding": needing["needs_embedding"],
            "rows_needing_enrichment": needing["needs_enrichment"],
            "reasons": dict(counts),
            **{f"rows_{r.value}": counts.get(r.value, 0) for r in Reason},
            **timing(started, out.num_rows),
        },
    )


def classify(
    store: Store | None, dataset: DatasetConfig, batch: pa.Table, *, force: bool, left: int | None
) -> tuple[pa.Table, int | None]:
    """One batch classified as a run does (failures cooling down left out unless ``force``), at most ``left``
    rows of work kept (``--limit``, shared over the batches in order); and what is left of it."""
    cooling: set[object] = set()
    if not force and store is not None:
        cooling = store.ledger.cooling_down_ids(batch.column("id").to_pylist(), dataset.failure_cooldown_hours)
    detected = detect(batch, dataset, force=force, cooling_ids=cooling)
    if left is not None:
        before = _work_rows(detected)
        detected = apply_limit(detected, left)
        left -= min(before, left)
    return detected, left


def _work_rows(detected: pa.Table) -> int:
    return int(pc.sum(pc.or_(detected.column("needs_embedding"), detected.column("needs_enrichment"))).as_py() or 0)


def _not_yet_recorded(store: Store, failures: list[Failure]) -> list[Failure]:
    """The provider steps record their failures when they end; those they could not (the database was
    away), and unreadable texts, are recorded with the write."""
    recent = store.ledger.failed_since(1.0) if any(f.stage != "read" for f in failures) else set()
    return [f for f in failures if f.stage == "read" or str(f.row_id) not in recent]


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
    detected: pa.Table | Spool,
    enrichment: pa.Table | Spool,
    embeddings: pa.Table | Spool,
    log: Log,
) -> StepResult:
    """Write the results ``rows_in_memory`` at a time, record failures, clear the failures of rows that
    succeeded, release the lease."""
    started = time.monotonic()
    detected, enrichment, embeddings = as_spool(detected), as_spool(enrichment), as_spool(embeddings)
    enriched = enrichment.read()  # text columns only: small beside the vectors
    failures = unreadable_failures(detected.read(["id", TEXT_ERROR])) + stage_failures("enrichment", enriched)
    stats = WriteStats()
    written_ids: list[object] = []
    with lease.held() as holder:
        if holder is not None:
            return skipped(lease, holder, log, None, rows_written=0)

        def write(enr: pa.Table, emb: pa.Table) -> None:
            results = merge_results(dataset, enr, emb)
            stats.add(store.rows.write_results(results, dataset.write_batch_size))
            written_ids.extend(results.column("id").to_pylist())
            release_memory()

        for emb in embeddings.batches(dataset.rows_in_memory):
            failures += stage_failures("embedding", emb)
            write(enriched.filter(pc.is_in(enriched.column("id"), value_set=emb.column("id"))), emb)
        embedded = embeddings.column("id")
        rest = enriched.filter(pc.invert(pc.is_in(enriched.column("id"), value_set=embedded)))
        for start in range(0, rest.num_rows, dataset.rows_in_memory):
            write(rest.slice(start, dataset.rows_in_memory), embeddings.schema.empty_table())
        rejected = [Failure(row_id, "write", "rejected_by_database", message) for row_id, message in stats.rejected]
        for failure in rejected:
            log.warning(f"write failed for row id {failure.row_id}: {failure.message}")
        store.ledger.record_failures(_not_yet_recorded(store, failures) + rejected)
        failed = {f.row_id for f in failures} | {f.row_id for f in rejected}
        store.ledger.clear_failures(sorted({i for i in written_ids if i not in failed}, key=str))
        deleted = remove_orphans(store, dataset, lease.key, log)
    lease.release()
    counts = dict(Counter(detected.column("reason").to_pylist()))
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
