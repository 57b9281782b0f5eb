"""Coverage: how many rows hold a valid, current embedding (and enrichment), and why the rest do not.

It runs the same detection as the graph, so "covered" means exactly what a run would leave alone.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from .config import DatasetConfig
from .detection import Reason, detect, reason_counts
from .partitions import work_test
from .stores import PartitionSpec, Store


@dataclass
class Coverage:
    rows: int = 0
    reasons: Counter = field(default_factory=Counter)

    @property
    def with_text(self) -> int:
        return self.rows - self.reasons[Reason.NO_TEXT.value]

    @property
    def covered(self) -> int:
        return self.reasons[Reason.OK.value]

    @property
    def needing_work(self) -> int:
        return self.with_text - self.covered

    @property
    def percent(self) -> float:
        return 100.0 * self.covered / self.with_text if self.with_text else 100.0

    def add(self, other: Coverage) -> None:
        self.rows += other.rows
        self.reasons.update(other.reasons)


def partition_coverage(store: Store, dataset: DatasetConfig, part: PartitionSpec, exact: bool = False) -> Coverage:
    """One partition's coverage. The database counts its rows and says which need work; only those are read
    and run through detection (after a write: few), so a check costs an aggregate, not a re-read of every
    vector. ``exact`` (or a database that cannot test the stored vectors) reads and detects every row."""
    if exact or not store.rows.queries().tests_vectors():
        return _read_coverage(store, dataset, part)
    try:
        return _counted_coverage(store, dataset, part)
    except sqlite3.OperationalError:  # text SQLite cannot hand to Python (not UTF-8): read it as a run does
        return _read_coverage(store, dataset, part)


def _read_coverage(store: Store, dataset: DatasetConfig, part: PartitionSpec) -> Coverage:
    raw = store.rows.read_partition(part, dataset.read_batch_size)
    ids = raw.column("id").to_pylist()
    cooling = store.ledger.cooling_down_ids(ids, dataset.failure_cooldown_hours)
    detected = detect(raw, dataset, cooling_ids=cooling)
    return Coverage(rows=raw.num_rows, reasons=Counter(reason_counts(detected)))


def _counted_coverage(store: Store, dataset: DatasetConfig, part: PartitionSpec) -> Coverage:
    rows, with_text = store.rows.queries().partition_counts(part)
    reasons: Counter = Counter()
    read = 0
    for batch in store.rows.read_batches(part, dataset.read_batch_size, pending=work_test(dataset)):
        raw = pa.Table.from_batches([batch])
        cooling = store.ledger.cooling_down_ids(raw.column("id").to_pylist(), dataset.failure_cooldown_hours)
        reasons.update(reason_counts(detect(raw, dataset, cooling_ids=cooling)))
        read += raw.num_rows
    return partly_read(rows, with_text, reasons, read)


def partly_read(rows: int, with_text: int, reasons: Counter, read: int) -> Coverage:
    """A partition's coverage from its counts and the reasons of the ``read`` rows the database said need
    work: the rows not read are up to date, or without text."""
    reasons = Counter(reasons)
    unread = max(0, rows - read)
    no_text = min(max(0, rows - with_text - reasons[Reason.NO_TEXT.value]), unread)
    reasons[Reason.NO_TEXT.value] += no_text
    reasons[Reason.OK.value] += unread - no_text
    return Coverage(rows=rows, reasons=+reasons)
