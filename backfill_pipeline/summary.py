"""A dataset's whole-table summary for the UI: coverage per partition, failures by class, spend to date.

Coverage comes from one aggregate query grouped by partition (the same test as the schedule's), so the
summary costs one statement however large the table; rows cooling down after a failure are not covered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import DatasetConfig
from .partitions import grouping_of, key_of_group, work_test
from .stores import Store


@dataclass
class PartitionCoverage:
    key: str
    rows: int = 0
    with_text: int = 0
    not_covered: int = 0
    cooling_down: int = 0

    @property
    def percent(self) -> float:
        return 100.0 * (self.with_text - self.not_covered) / self.with_text if self.with_text else 100.0


@dataclass
class DatasetSummary:
    name: str
    partitions: list[PartitionCoverage]
    failures: dict[str, dict[str, int]] = field(default_factory=dict)
    spend_usd: float = 0.0

    @property
    def total(self) -> PartitionCoverage:
        total = PartitionCoverage("(all)")
        for p in self.partitions:
            total.rows += p.rows
            total.with_text += p.with_text
            total.not_covered += p.not_covered
            total.cooling_down += p.cooling_down
        return total

    def metadata(self) -> dict[str, Any]:
        """Numbers (plotted by the UI across materializations) and the Markdown report."""
        t = self.total
        return {
            "rows": t.rows,
            "rows_with_text": t.with_text,
            "rows_covered": t.with_text - t.not_covered,
            "rows_needing_work": t.not_covered,
            "rows_failed_cooling_down": t.cooling_down,
            "coverage_percent": round(t.percent, 2),
            "partitions": len(self.partitions),
            "partitions_complete": sum(1 for p in self.partitions if p.not_covered == 0),
            "failures_recorded": sum(n for classes in self.failures.values() for n in classes.values()),
            "spend_usd": round(self.spend_usd, 6),
        }

    def markdown(self) -> str:
        t = self.total
        lines = [
            f"## {self.name}: {t.percent:.1f}% covered",
            "",
            f"{t.with_text - t.not_covered:,} of {t.with_text:,} rows with text hold a current embedding "
            f"({t.rows:,} rows in all); {t.not_covered:,} need work, {t.cooling_down:,} of them failed and "
            f"are cooling down. Spend to date: ${self.spend_usd:.4f}.",
            "",
            "| partition | rows | with text | needing work | cooling down | coverage |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        incomplete = [p for p in self.partitions if p.not_covered] or self.partitions[:0]
        shown = incomplete[:50]
        lines += [
            f"| {p.key} | {p.rows:,} | {p.with_text:,} | {p.not_covered:,} | {p.cooling_down:,} | {p.percent:.1f}% |"
            for p in shown
        ]
        if len(incomplete) > len(shown):
            lines.append(f"| … {len(incomplete) - len(shown)} more partitions needing work | | | | | |")
        lines.append(f"| **all {len(self.partitions)}** | {t.rows:,} | {t.with_text:,} | {t.not_covered:,} | "
                     f"{t.cooling_down:,} | {t.percent:.1f}% |")  # fmt: skip
        if self.failures:
            lines += ["", "### Failures by class", "", "| stage | class | rows |", "|---|---|---:|"]
            for stage, classes in sorted(self.failures.items()):
                lines += [f"| {stage} | {cls} | {n:,} |" for cls, n in sorted(classes.items())]
        return "\n".join(lines)


def dataset_summary(name: str, dataset: DatasetConfig, store: Store, spend_usd: float) -> DatasetSummary:
    """The summary of the whole table, from one aggregate query and the failures table."""
    by_key: dict[str, PartitionCoverage] = {}
    for group, rows, with_text, not_covered, cooling in store.rows.queries().coverage(
        grouping_of(dataset), work_test(dataset)
    ):
        key = key_of_group(group, dataset)
        if key is None:
            continue
        part = by_key.setdefault(key, PartitionCoverage(key))
        part.rows += int(rows)
        part.with_text += int(with_text or 0)
        part.not_covered += int(not_covered or 0)
        part.cooling_down += int(cooling or 0)
    partitions = sorted(by_key.values(), key=lambda p: p.key)
    return DatasetSummary(name, partitions, store.ledger.failure_classes(), spend_usd)
