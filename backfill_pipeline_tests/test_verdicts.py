"""The written table's checks and the summary: what they say about coverage readings, tested alone, and
the summary's aggregate against the run's own detection."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from backfill_pipeline.config import load_config
from backfill_pipeline.coverage import Coverage, partition_coverage
from backfill_pipeline.detection import Reason
from backfill_pipeline.partitions import partition_activity, partition_spec
from backfill_pipeline.stores import Failure, open_store
from backfill_pipeline.summary import dataset_summary
from backfill_pipeline.verdicts import verdicts

from .conftest import query


def _verdicts(reasons: dict[str, int], max_failure_rate: float = 0.01) -> dict[str, bool]:
    coverage = Coverage(rows=sum(reasons.values()), reasons=Counter(reasons))
    return {v.check: v.passed for v in verdicts(coverage, max_failure_rate)}


def test_a_fully_covered_partition_passes_every_check() -> None:
    assert _verdicts({"ok": 98, "no_text": 2}) == dict.fromkeys(
        ("embedding_coverage", "vectors_valid", "no_placeholders", "failure_rate"), True
    )


def test_rows_cooling_down_are_not_covered_and_count_as_failures() -> None:
    assert _verdicts({"ok": 98, Reason.COOLING_DOWN.value: 2}) == {
        "embedding_coverage": False,  # the table still lacks them
        "vectors_valid": True,
        "no_placeholders": True,
        "failure_rate": False,  # 2% > 1%
    }
    assert _verdicts({"ok": 98, Reason.COOLING_DOWN.value: 2}, max_failure_rate=0.05)["failure_rate"]


def test_invalid_vectors_and_placeholders_are_named() -> None:
    coverage = Coverage(
        rows=5, reasons=Counter({"ok": 2, "wrong_dimension": 1, "non_finite": 1, "placeholder_zero": 1})
    )
    by_check = {v.check: v for v in verdicts(coverage, 0.01)}
    assert not by_check["vectors_valid"].passed and by_check["vectors_valid"].metadata["rows_invalid"] == 2
    assert "wrong_dimension" in by_check["vectors_valid"].description
    assert not by_check["no_placeholders"].passed and by_check["no_placeholders"].metadata["placeholder_zero"] == 1


def test_the_summary_aggregate_agrees_with_detection(demo_db: Path, demo_config_path: Path) -> None:
    dataset = load_config(demo_config_path).datasets["jobs"]
    [(failed_id,)] = query(demo_db, "SELECT min(id) FROM job_postings WHERE embedding IS NULL AND description <> ''")
    with open_store("jobs", dataset) as store:
        store.ledger.record_failures([Failure(failed_id, "embedding", "rate_limited", "429 after 5 attempts")])
        summary = dataset_summary("jobs", dataset, store, spend_usd=0.25)
        expected = Coverage()
        for key, _ in partition_activity(store.rows, dataset):
            expected.add(partition_coverage(store, dataset, partition_spec(key, dataset, store.rows)))
    total = summary.total
    assert (total.rows, total.with_text, total.not_covered) == (
        expected.rows,
        expected.with_text,
        expected.needing_work,
    )
    assert total.cooling_down == expected.reasons[Reason.COOLING_DOWN.value] == 1
    meta = summary.metadata()
    assert meta["coverage_percent"] == round(expected.percent, 2) and meta["spend_usd"] == 0.25
    assert meta["failures_recorded"] == 1 and "| embedding | rate_limited | 1 |" in summary.markdown()
