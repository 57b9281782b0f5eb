"""The store interfaces: the dataset's rows, and the pipeline's own bookkeeping, behind one handle.

A store is opened for one dataset. Identifiers are always quoted by the implementations; the dataset's
``row_filter`` is the only raw SQL, and is documented as trusted.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ..rows import raw_schema, vector_array
from .layout import TableLayout

if TYPE_CHECKING:
    from .groups import Grouping, GroupQueries, WorkTest

FAILURES_TABLE = "backfill_failures"
LEASES_TABLE = "backfill_leases"
CACHE_TABLE = "backfill_cache"
CLAIM = "claim:"  # the cache table's keys for texts being paid for right now (see Ledger.cache_claim)
BUDGET_TABLE = "backfill_rate_limits"
BATCHES_TABLE = "backfill_batches"
Floors = tuple[float, float]  # seconds after now below which the request and token times may not lie
BURST_SUFFIX = "#burst"  # the budget table's row for a budget's learned burst (seconds, in request_tat)
OWN_TABLES = (FAILURES_TABLE, LEASES_TABLE, CACHE_TABLE, BUDGET_TABLE, BATCHES_TABLE)


class StoreError(RuntimeError):
    """A database problem the user must fix (missing table or column, wrong type)."""


class SchemaError(StoreError):
    """The table does not fit the config (missing column, wrong type or dimension): retrying cannot help."""


class ConnectionLostError(StoreError):
    """The database went away mid-operation; a retry after it is back completes the work."""


class DatabaseTimeoutError(StoreError):
    """A statement hit lock_timeout or statement_timeout; a retry (after the lock is gone) completes the work."""


class MissingColumnsError(SchemaError):
    def __init__(self, dataset: str, table: str, columns: Sequence[str]):
        self.columns = list(columns)
        super().__init__(
            f"dataset '{dataset}': the database lacks {', '.join(self.columns)} (result columns of {table} "
            "or the pipeline's own tables). "
            f"Add them with `backfill-pipeline migrate --dataset {dataset}` "
            f"or run the raw_rows asset with config `migrate: true`."
        )


@dataclass(frozen=True)
class PartitionSpec:
    """What a partition key selects: an inclusive id range, a hash bucket ``(bucket, buckets)``, one archive
    value (or the rows without one), or the rows whose ``window_column`` falls on the UTC days
    ``[start, end)``."""

    key: str
    id_range: tuple[int, int] | None = None
    archive: str | None = None
    bucket: tuple[int, int] | None = None
    null_archive: bool = False
    window: tuple[date, date] | None = None
    window_column: str | None = None


@dataclass(frozen=True)
class Failure:
    row_id: object
    stage: str
    error_class: str
    message: str


@dataclass
class WriteStats:
    rows_written: int = 0
    batches: int = 0
    rejected: list[tuple[object, str]] = field(default_factory=list)  # (row id, the database's words)

    def add(self, other: WriteStats) -> None:
        self.rows_written += other.rows_written
        self.batches += other.batches
        self.rejected += other.rejected


def write_splitting(
    write: Callable[[int, int], int],
    start: int,
    stop: int,
    ids: Sequence[object],
    rejects: tuple[type[Exception], ...],
    describe: Callable[[Exception], str],
) -> WriteStats:
    """Write rows ``[start, stop)`` in one transaction; when the database rejects a value, halve the range
    until the row at fault is found, and write the others: one bad row never costs its batch's paid work."""
    stats = WriteStats()
    try:
        stats.rows_written += write(start, stop)
        stats.batches += 1
    except rejects as exc:
        if stop - start == 1:
            stats.rejected.append((ids[start], describe(exc)))
            return stats
        middle = (start + stop) // 2
        stats.add(write_splitting(write, start, middle, ids, rejects, describe))
        stats.add(write_splitting(write, middle, stop, ids, rejects, describe))
    return stats


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def encode_skills(value: str | Iterable[str] | None) -> str | None:
    """Skills as stored in a text/JSON column: a JSON array."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(list(value), ensure_ascii=False)


class RowStore(ABC):
    """The dataset's table (and its results table, if separate): reading rows, writing results."""

    def __init__(self, layout: TableLayout):
        self.layout = layout

    @abstractmethod
    def missing_columns(self) -> list[str]:
        """Result columns (or the results table) that do not exist yet, as ``table.column``."""

    @abstractmethod
    def add_missing_columns(self) -> None:
        """Create the results table or the result columns that :meth:`missing_columns` reports."""

    def check_columns(self) -> None:  # noqa: B027 - optional hook
        """Types of existing columns that cannot hold what the pipeline writes; nothing to check by default."""

    @abstractmethod
    def check_keys(self) -> None:
        """The id column fits the partitioning (integers for id ranges) and a time column is a timestamp."""

    @abstractmethod
    def integer_ids(self) -> bool:
        """Whether the id column holds integers (else ids travel as their text: UUIDs, text keys)."""

    @abstractmethod
    def queries(self) -> GroupQueries:
        """The table-wide aggregate queries, in this database's dialect."""

    def id_type(self) -> pa.DataType:
        return pa.int64() if self.integer_ids() else pa.string()

    def queued_groups(self, grouping: Grouping, after: int) -> tuple[list[tuple], int]:
        """``(group value, rows)`` of the rows queued by the change-capture trigger after entry ``after``,
        and the last entry's number."""
        raise StoreError(f"dataset '{self.layout.dataset}': change capture by trigger needs Postgres")

    def acknowledge_queue(self, upto: int) -> int:
        """Forget the queued entries up to ``upto``, once the sensor's cursor past them is stored."""
        raise StoreError(f"dataset '{self.layout.dataset}': change capture by trigger needs Postgres")

    @abstractmethod
    def delete_orphans(self, part: PartitionSpec) -> int:
        """Delete the separate results rows of ``part`` whose source row is gone or filtered out."""

    @abstractmethod
    def read_batches(
        self, part: PartitionSpec, batch_size: int, pending: WorkTest | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Stream the partition's rows in the raw-rows layout, ``batch_size`` rows at a time; with
        ``pending``, only the rows the database's test says need work (cooling down or not)."""

    def read_partition(self, part: PartitionSpec, batch_size: int = 2_000, pending: WorkTest | None = None) -> pa.Table:
        batches = list(self.read_batches(part, batch_size, pending))
        return pa.Table.from_batches(batches, schema=self.raw_schema())

    def where_clause(self, part: PartitionSpec | None, pending: WorkTest | None) -> tuple[str, list[object]]:
        """The WHERE of a read: the partition's conditions and, with ``pending``, the needs-work test."""
        clauses: list[str] = []
        params: list[object] = []
        queries = self.queries()
        if part is not None:
            clauses, params = queries.partition_clause(part)
        if pending is not None:
            condition, more = queries.needs_work(pending, exclude_cooling=False)
            clauses.append(f"({condition})")
            params += more
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def raw_schema(self) -> pa.Schema:
        return raw_schema(self.layout.text_fields, self.layout.enrichment_fields, self.id_type())

    def nearest(self, query: np.ndarray, k: int) -> list[tuple[object, float]] | None:
        """(id, cosine similarity) of the ``k`` stored vectors nearest ``query``, ranked by the database;
        None where it cannot rank (the caller ranks with numpy)."""
        return None

    def texts(self, row_ids: Sequence[object]) -> dict[object, tuple[str, ...]]:
        """The text fields of these rows, for showing them."""
        return {}

    @staticmethod
    def vector_columns(
        values: Sequence[object], decode: Callable[[Any], np.ndarray | None]
    ) -> tuple[pa.Array, pa.Array]:
        """The stored embeddings of a batch as a list<float32> column, and why a value could not be read
        (null when it could): one unreadable row is re-embedded, it never fails the partition."""
        vectors: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for value in values:
            try:
                vectors.append(decode(value))
                errors.append(None)
            except ValueError as exc:
                vectors.append(None)
                errors.append(str(exc))
        return vector_array(vectors), pa.array(errors, pa.string())

    @abstractmethod
    def write_results(self, results: pa.Table, batch_size: int) -> WriteStats:
        """Write result columns by id, ``batch_size`` rows per transaction.

        ``results`` holds ``id`` and any of ``embedding`` (fixed-size list), ``content_hash``, ``model``,
        ``embedded_at``, ``enrichment:<field>`` and ``enriched_at``; a null leaves the stored value.
        """


@dataclass(frozen=True)
class BatchRecord:
    """One batch submitted to a provider's batch API for a partition's stage.

    Recorded (state ``submitting``, with ``lines``: the cache keys each request line stands for) before the
    request file is uploaded, and given its ``batch_id`` as soon as the provider answers, so a run killed at
    any point resumes the same batch instead of paying for its work twice. ``label`` is sent along (OpenAI
    metadata, Gemini display name): a run killed between the provider's answer and the record finds it by it.
    """

    label: str
    partition_key: str
    stage: str
    batch_id: str | None
    state: str  # submitting, submitted, done
    lines: list[list[str]]


class Ledger(ABC):
    """The pipeline's own tables: failures, partition leases, the paid-results cache, rate budgets.

    Cache and budget methods are called from the engine's worker threads.
    """

    def __init__(self, dataset: str):
        self.dataset = dataset

    @abstractmethod
    def missing_tables(self) -> list[str]: ...

    @abstractmethod
    def create_tables(self) -> None: ...

    # -- failures --------------------------------------------------------------------------------
    @abstractmethod
    def record_failures(self, failures: Sequence[Failure]) -> None:
        """Upsert failures (attempts counted, first and last time kept)."""

    @abstractmethod
    def clear_failures(self, row_ids: Sequence[object], stages: Sequence[str] | None = None) -> int: ...

    @abstractmethod
    def failed_since(self, hours: float) -> set[str]:
        """Row ids (as text) that failed less than ``hours`` ago and were not re-queued."""

    def cooling_down_ids(self, row_ids: Sequence[object], hours: float) -> set[object]:
        """Ids among ``row_ids`` that failed less than ``hours`` ago."""
        if hours <= 0 or not row_ids:
            return set()
        failed = self.failed_since(hours)
        return {i for i in row_ids if str(i) in failed}

    @abstractmethod
    def failures(self, limit: int = 100, offset: int = 0) -> list[dict]: ...

    @abstractmethod
    def failure_count(self) -> int: ...

    @abstractmethod
    def failure_classes(self) -> dict[str, dict[str, int]]:
        """Recorded failures by stage and error class."""

    @abstractmethod
    def requeue_failures(self, row_ids: Sequence[object] | None = None) -> int:
        """Make failed rows eligible at once (their cool-down ends now); return how many."""

    # -- paid-results cache and shared rate budgets ------------------------------------------------
    @abstractmethod
    def cache_get(self, keys: Sequence[str], max_age_days: float) -> dict[str, bytes]: ...

    @abstractmethod
    def cache_put(self, items: dict[str, bytes]) -> None: ...

    @abstractmethod
    def cache_claim(self, keys: Sequence[str], owner: str, seconds: float) -> set[str]:
        """Claim the texts about to be paid for, so runs at once pay for each only once: return the keys
        now held by ``owner`` for ``seconds`` (newly, or renewed); a key another owner holds is not taken
        until that claim expires. Claims are rows of the cache table under ``claim:`` keys."""

    @abstractmethod
    def cache_release(self, keys: Sequence[str], owner: str) -> None:
        """Drop ``owner``'s claims on ``keys`` (answered, failed or abandoned)."""

    @abstractmethod
    def reserve_budget(
        self, key: str, request_seconds: float, token_seconds: float, burst_seconds: float, floors: Floors = (0, 0)
    ) -> float:
        """Reserve one request's share of a per-minute budget shared by every process; return the wait.

        Generic cell rate algorithm: each budget keeps a theoretical arrival time per dimension
        (requests, tokens); a reservation moves it forward by the request's cost in seconds of budget,
        and the caller waits for whatever lies beyond ``burst_seconds`` ahead of now. ``floors`` first
        moves each time to at least that many seconds after now: the debt the server's headers showed.
        """

    @abstractmethod
    def budget_burst(self, key: str) -> float | None:
        """The burst (seconds of budget) that the processes sharing this budget learned from the server."""

    @abstractmethod
    def set_budget_burst(self, key: str, seconds: float, lower: bool = False) -> float:
        """Share a burst learned from the server with every process of this budget (kept if it is larger than
        the one already shared), or lower it (after a 429); return the burst now shared."""

    # -- batches (mode: batch) ---------------------------------------------------------------------
    @abstractmethod
    def batch_intent(self, record: BatchRecord) -> None:
        """Record a batch about to be submitted (before its file is uploaded)."""

    @abstractmethod
    def batch_submitted(self, label: str, batch_id: str) -> None: ...

    @abstractmethod
    def batch_done(self, label: str, note: str) -> None:
        """The batch's answers are collected (or it never reached the provider): it is no longer polled."""

    @abstractmethod
    def open_batches(self, partition_key: str, stage: str) -> list[BatchRecord]:
        """The partition's batches for ``stage`` not yet collected, oldest first."""

    # -- partition leases ------------------------------------------------------------------------
    @abstractmethod
    def _try_lease(self, key: str, run_id: str, replace: str | None) -> bool:
        """Atomically take the lease on ``key`` if free, already ours, or held by ``replace``."""

    @abstractmethod
    def lease_holder(self, key: str) -> tuple[str, float] | None:
        """The run holding the lease on ``key`` and the seconds since it last renewed it, if any."""

    @abstractmethod
    def renew_lease(self, key: str, run_id: str) -> bool:
        """Record that ``run_id`` still works on ``key``; False when it no longer holds the lease."""

    @abstractmethod
    def release_partition(self, key: str, run_id: str) -> None: ...

    @abstractmethod
    def live_leases_before(self, key: str, seconds: float) -> int:
        """How many partitions ordered before ``key`` are held by a run that renewed within ``seconds``."""

    def claim_partition(self, key: str, run_id: str, is_alive: Callable[[str, float], bool]) -> str | None:
        """Claim the partition for ``run_id``; return ``None`` when claimed, else the live holder's run id.

        Two runs of one partition (a UI backfill and the sensor, say) must not both pay for its rows.
        A lease left by a run that is no longer alive (not renewed in time, or finished) is taken over.
        """
        holder = "unknown"
        for _ in range(3):  # the lease may change hands between our statements; look again
            if self._try_lease(key, run_id, None):
                return None
            held = self.lease_holder(key)
            if held is None:
                continue
            holder, age = held
            if is_alive(holder, age):
                return holder
            if self._try_lease(key, run_id, holder):
                return None
        return holder


class Store:
    """One open database of a dataset: its rows and the pipeline's ledger, sharing a connection."""

    def __init__(
        self,
        rows: RowStore,
        ledger: Ledger,
        close: Callable[[], None],
        transaction: Callable[[], AbstractContextManager[object]],
    ):
        self.rows = rows
        self.ledger = ledger
        self._close = close
        self._transaction = transaction

    @property
    def layout(self) -> TableLayout:
        return self.rows.layout

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._close()

    def missing_columns(self) -> list[str]:
        return self.rows.missing_columns() + self.ledger.missing_tables()

    def check_schema(self) -> None:
        self.rows.check_keys()
        missing = self.missing_columns()
        if missing:
            raise MissingColumnsError(self.layout.dataset, str(self.layout.source), missing)
        self.rows.check_columns()

    def migrate(self) -> list[str]:
        """Add what :meth:`missing_columns` reports; return what was added."""
        self.rows.check_keys()  # a key the partitioning cannot use is refused before anything is altered
        added = self.missing_columns()
        if added:
            with self._transaction():  # all of it or nothing
                self.rows.add_missing_columns()
                self.ledger.create_tables()
        return added
