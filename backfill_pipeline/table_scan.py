"""Table-wide readings without reading the table: rows per partition from one aggregate query, and only
the rows the database says need work read and run through detection, as a run would.

``coverage``, ``status`` and ``plan`` use it, so an up-to-date table of a million rows costs one query,
not a read of every vector into Python. Exact wherever the database can test the stored vectors; where it
cannot (vectors kept in a ``text`` column on Postgres) :func:`read_pending` returns None and callers read
the partitions. On Postgres, constant and sequential placeholders of the right length are seen only by a
run's (or ``--exact``) detection.
"""

from __future__ import annotations

import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from .config import DatasetConfig
from .coverage import Coverage, partly_read
from .detection import detect
from .partitions import (
    NULL_ARCHIVE_KEY,
    grouping_of,
    hash_key,
    key_of_group,
    partition_spec,
    range_key,
    slugify,
    work_test,
)
from .stores import PartitionSpec, Store
from .stores.groups import hash_bucket


@dataclass
class TableReading:
    counts: dict[str, list[int]] = field(default_factory=dict)  # key -> [rows, rows with text]
    detected: dict[str, list[pa.Table]] = field(default_factory=lambda: defaultdict(list))

    def detected_rows(self, key: str) -> pa.Table | None:
        tables = self.detected.get(key)
        return pa.concat_tables(tables) if tables else None

    def coverage(self, key: str) -> Coverage:
        rows, with_text = self.counts.get(key, [0, 0])
        reasons: Counter = Counter()
        read = 0
        for table in self.detected.get(key, []):
            reasons.update(table.column("reason").to_pylist())
            read += table.num_rows
        return partly_read(rows, with_text, reasons, read)


def _row_keys(raw: pa.Table, dataset: DatasetConfig) -> list[str]:
    spec = dataset.partitioning
    ids = raw.column("id").to_pylist()
    if spec.kind == "id_range":
        return [range_key(int(i) // spec.width, spec.width) for i in ids]
    if spec.kind == "hash":
        return [hash_key(hash_bucket(str(i), spec.buckets), spec.buckets) for i in ids]
    return [NULL_ARCHIVE_KEY if a is None else slugify(a) for a in raw.column("archive").to_pylist()]


def _pending_batches(store: Store, dataset: DatasetConfig, keys: list[str]) -> Iterator[tuple[str | None, pa.Table]]:
    """The rows needing work, with their partition key (None: compute it per row), batch by batch."""
    test = work_test(dataset)
    if dataset.partitioning.kind == "time":  # a row's day is not among its raw columns: read per partition
        for key in keys:
            part = partition_spec(key, dataset, store.rows)
            for batch in store.rows.read_batches(part, dataset.read_batch_size, pending=test):
                yield key, pa.Table.from_batches([batch])
        return
    for batch in store.rows.read_batches(PartitionSpec(key="all"), dataset.read_batch_size, pending=test):
        yield None, pa.Table.from_batches([batch])


def read_pending(store: Store, dataset: DatasetConfig, keys: list[str] | None = None) -> TableReading | None:
    """Counts per partition (of ``keys``, else all holding rows) and the detected rows needing work; None
    when the database cannot answer (then callers read the partitions)."""
    try:
        return _read_pending(store, dataset, keys)
    except sqlite3.OperationalError:  # text SQLite cannot hand to Python (not UTF-8): read it as a run does
        return None


def _read_pending(store: Store, dataset: DatasetConfig, keys: list[str] | None) -> TableReading | None:
    queries = store.rows.queries()
    if not queries.tests_vectors():
        return None
    reading = TableReading()
    for group, rows, with_text in queries.text_counts(grouping_of(dataset)):
        key = key_of_group(group, dataset)
        if key is None or (keys is not None and key not in keys):
            continue
        counts = reading.counts.setdefault(key, [0, 0])
        counts[0] += int(rows)
        counts[1] += int(with_text or 0)
    if keys is not None:
        reading.counts = {k: reading.counts.get(k, [0, 0]) for k in keys}
    wanted = set(reading.counts)
    for key, raw in _pending_batches(store, dataset, list(reading.counts)):
        cooling = store.ledger.cooling_down_ids(raw.column("id").to_pylist(), dataset.failure_cooldown_hours)
        detected = detect(raw, dataset, cooling_ids=cooling)
        if key is not None:
            reading.detected[key].append(detected)
            continue
        positions: dict[str, list[int]] = defaultdict(list)
        for i, k in enumerate(_row_keys(raw, dataset)):
            positions[k].append(i)
        for k, where in positions.items():
            if k in wanted:
                reading.detected[k].append(detected.take(pa.array(where, pa.int64())))
    return reading
