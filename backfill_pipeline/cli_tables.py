"""What the CLI prints: aligned tables, and coverage as table rows and as JSON."""

from __future__ import annotations

from .config import DatasetConfig
from .coverage import Coverage, partition_coverage
from .detection import Reason
from .partitions import partition_activity, partition_spec
from .stores import open_store
from .table_scan import read_pending


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print(
            "  ".join(c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


COVERAGE_HEADERS = ["dataset", "partition", "rows", "with text", "covered", "coverage", "needing work"]


def coverage_rows(name: str, dataset: DatasetConfig, by_partition: bool, exact: bool = False) -> list[list[object]]:
    """Coverage per partition and in all: counted by the database, with only the rows needing work read
    (``exact``: every row read and detected, as a run would)."""
    rows: list[list[object]] = []
    total = Coverage()
    with open_store(name, dataset) as store:
        store.check_schema()
        keys = [key for key, _ in partition_activity(store.rows, dataset)]
        reading = None if exact else read_pending(store, dataset, keys)
        for key in keys:
            if reading is not None:
                cov = reading.coverage(key)
            else:
                cov = partition_coverage(store, dataset, partition_spec(key, dataset, store.rows), exact=True)
            total.add(cov)
            if by_partition:
                rows.append(coverage_row(name, key, cov))
    rows.append(coverage_row(name, "(all)", total))
    return rows


def coverage_row(name: str, key: str, cov: Coverage) -> list[object]:
    pending = {r: n for r, n in cov.reasons.items() if r not in (Reason.OK.value, Reason.NO_TEXT.value)}
    detail = ", ".join(f"{r}={n}" for r, n in sorted(pending.items())) or "-"
    return [name, key, cov.rows, cov.with_text, cov.covered, f"{cov.percent:.1f}%", detail]


def coverage_json(row: list[object]) -> dict[str, object]:
    keys = ["dataset", "partition", "rows", "with_text", "covered", "coverage_percent", "needing_work"]
    return dict(zip(keys, [*row[:5], float(str(row[5]).rstrip("%")), reasons_of(str(row[6]))], strict=True))


def reasons_of(detail: str) -> dict[str, int]:
    """``"null_embedding=3, stale_text=1"`` as a mapping (``-``: none)."""
    if detail == "-":
        return {}
    return {k: int(v) for k, v in (part.split("=") for part in detail.split(", "))}
