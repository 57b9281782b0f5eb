"""Coverage: how many rows hold a valid, current embedding (and enrichment), and why the rest do not.

It runs the same detection as the graph, so "covered" means exactly what a run would leave alone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .config import DatasetConfig
from .detection import Reason, detect, reason_counts
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


def partition_coverage(store: Store, dataset: DatasetConfig, part: PartitionSpec) -> Coverage:
    raw = store.rows.read_partition(part, dataset.read_batch_size)
    ids = raw.column("id").to_pylist()
    cooling = store.ledger.cooling_down_ids(ids, dataset.failure_cooldown_hours)
    detected = detect(raw, dataset, cooling_ids=cooling)
    return Coverage(rows=raw.num_rows, reasons=Counter(reason_counts(detected)))
