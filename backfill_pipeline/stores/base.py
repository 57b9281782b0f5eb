"""The store interface: everything the assets, sensor, schedule and CLI need from a database.

A store is opened for one dataset. Identifiers from the config are always quoted as identifiers by the
implementation; the dataset's ``row_filter`` is the only raw SQL, and is documented as trusted.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa

from ..config import DatasetConfig
from ..rows import enrichment_col, raw_schema

FAILURES_TABLE = "backfill_failures"
LEASES_TABLE = "backfill_leases"
CACHE_TABLE = "backfill_cache"
BUDGET_TABLE = "backfill_rate_limits"
OWN_TABLES = (FAILURES_TABLE, LEASES_TABLE, CACHE_TABLE, BUDGET_TABLE)


class StoreError(RuntimeError):
    """A database problem the user must fix (missing table or column, wrong type)."""


class SchemaError(StoreError):
    """The table does not fit the config (missing column, wrong type or dimension): retrying cannot help."""


class ConnectionLostError(StoreError):
    """The database went away mid-operation; a retry after it is back completes the work."""


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
    """What a partition key selects: an inclusive id range, or one archive value."""

    key: str
    id_range: tuple[int, int] | None = None
    archive: str | None = None


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


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Store(ABC):
    """A dataset's table (and its results table, if separate) in one database."""

    def __init__(self, name: str, dataset: DatasetConfig):
        self.name = name
        self.dataset = dataset

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def close(self) -> None: ...

    # -- schema ----------------------------------------------------------------------------------
    @abstractmethod
    def missing_columns(self) -> list[str]:
        """Result columns (and the failures table) that do not exist yet, as ``table.column``."""

    @abstractmethod
    def migrate(self) -> list[str]:
        """Create what :meth:`missing_columns` reports; return what was added."""

    def check_schema(self) -> None:
        missing = self.missing_columns()
        if missing:
            raise MissingColumnsError(self.name, self.dataset.table, missing)

    # -- partitions ------------------------------------------------------------------------------
    @abstractmethod
    def id_buckets(self, width: int, after_id: int | None = None) -> list[tuple[int, int]]:
        """``(id // width, max id)`` for each id range holding rows (with id > ``after_id``), ascending."""

    @abstractmethod
    def archive_groups(self, after_id: int | None = None) -> list[tuple[str, int]]:
        """``(archive value, max id)`` for each archive holding rows (with id > ``after_id``)."""

    # -- rows ------------------------------------------------------------------------------------
    @abstractmethod
    def read_batches(self, part: PartitionSpec, batch_size: int) -> Iterator[pa.RecordBatch]:
        """Stream the partition's rows in the raw-rows layout, ``batch_size`` rows at a time."""

    def read_partition(self, part: PartitionSpec) -> pa.Table:
        schema = self.raw_schema()
        batches = list(self.read_batches(part, self.dataset.read_batch_size))
        return pa.Table.from_batches(batches, schema=schema)

    def raw_schema(self) -> pa.Schema:
        return raw_schema(self.dataset.text.fields, self.dataset.enrichment_columns)

    @abstractmethod
    def write_results(self, results: pa.Table, batch_size: int) -> WriteStats:
        """Write result columns by id, ``batch_size`` rows per transaction.

        ``results`` holds ``id`` and any of ``embedding`` (fixed-size list), ``content_hash``, ``model``,
        ``embedded_at``, ``enrichment:<field>`` and ``enriched_at``; a null leaves the stored value.
        """

    # -- failures --------------------------------------------------------------------------------
    @abstractmethod
    def record_failures(self, failures: Sequence[Failure]) -> None:
        """Upsert failures (attempts counted, first and last time kept)."""

    @abstractmethod
    def clear_failures(self, row_ids: Sequence[object], stages: Sequence[str] | None = None) -> int: ...

    @abstractmethod
    def cooling_down_ids(self, row_ids: Sequence[object], hours: float) -> set[object]:
        """Ids among ``row_ids`` that failed less than ``hours`` ago."""

    @abstractmethod
    def failures(self, limit: int = 100) -> list[dict]: ...

    @abstractmethod
    def requeue_failures(self, row_ids: Sequence[object] | None = None) -> int:
        """Make failed rows eligible at once (their cool-down ends now); return how many."""

    # -- partition leases ------------------------------------------------------------------------
    @abstractmethod
    def _try_lease(self, key: str, run_id: str, replace: str | None) -> bool:
        """Atomically take the lease on ``key`` if free, already ours, or held by ``replace``."""

    @abstractmethod
    def lease_holder(self, key: str) -> tuple[str, datetime] | None:
        """The run holding the lease on ``key`` and since when, if any."""

    @abstractmethod
    def release_partition(self, key: str, run_id: str) -> None: ...

    # -- paid-results cache and shared rate budgets (called from the engine's worker threads) -------
    @abstractmethod
    def cache_get(self, keys: Sequence[str], max_age_days: float) -> dict[str, bytes]: ...

    @abstractmethod
    def cache_put(self, items: dict[str, bytes]) -> None: ...

    @abstractmethod
    def reserve_budget(self, key: str, request_seconds: float, token_seconds: float, burst_seconds: float) -> float:
        """Reserve one request's share of a per-minute budget shared by every process; return the wait.

        Generic cell rate algorithm: each budget keeps a theoretical arrival time per dimension
        (requests, tokens); a reservation moves it forward by the request's cost in seconds of budget,
        and the caller waits for whatever lies beyond ``burst_seconds`` ahead of now.
        """

    def claim_partition(self, key: str, run_id: str, is_alive: Callable[[str, datetime], bool]) -> str | None:
        """Claim the partition for ``run_id``; return ``None`` when claimed, else the live holder's run id.

        Two runs of one partition (a UI backfill and the sensor, say) must not both pay for its rows.
        A lease left by a run that is no longer alive (crashed, failed, finished) is taken over.
        """
        holder = "unknown"
        for _ in range(3):  # the lease may change hands between our statements; look again
            if self._try_lease(key, run_id, None):
                return None
            held = self.lease_holder(key)
            if held is None:
                continue
            holder, since = held
            if is_alive(holder, since):
                return holder
            if self._try_lease(key, run_id, holder):
                return None
        return holder


def encode_skills(value: object) -> str | None:
    """Skills as stored in a text/JSON column: a JSON array."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(list(value), ensure_ascii=False)


def result_column_mapping(d: DatasetConfig, results: pa.Table) -> dict[str, str]:
    """Target column -> results column, for the result columns present in ``results``."""
    candidates = {
        d.embedding.column: "embedding",
        d.bookkeeping.content_hash: "content_hash",
        d.bookkeeping.model: "model",
        d.bookkeeping.embedded_at: "embedded_at",
        d.bookkeeping.enriched_at: "enriched_at",
        **{col: enrichment_col(f) for f, col in d.enrichment_columns.items()},
    }
    present = set(results.column_names)
    return {target: src for target, src in candidates.items() if src in present}
