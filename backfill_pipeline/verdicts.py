"""What the written table's checks say about a partition, from one coverage reading: plain values, so the
Dagster checks are thin and these rules are tested alone.

- ``embedding_coverage``: every row with text holds a current embedding (and enrichment). Rows cooling
  down after a failure are *not* covered: they are the rows the table still lacks.
- ``vectors_valid``: no stored vector is of another dimension, holds NaN or infinity, or cannot be read.
- ``no_placeholders``: no all-zero, constant or sequential placeholder is left.
- ``failure_rate``: the rows that failed (cooling down) are at most ``max_failure_rate`` of those with text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .coverage import Coverage
from .detection import Reason

INVALID = (Reason.WRONG_DIMENSION, Reason.NON_FINITE, Reason.UNREADABLE)
PLACEHOLDERS = (Reason.PLACEHOLDER_ZERO, Reason.PLACEHOLDER_CONSTANT, Reason.PLACEHOLDER_SEQUENTIAL)


@dataclass(frozen=True)
class Verdict:
    check: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _count(coverage: Coverage, reasons: tuple[Reason, ...]) -> dict[str, int]:
    return {r.value: coverage.reasons[r.value] for r in reasons if coverage.reasons[r.value]}


def verdicts(coverage: Coverage, max_failure_rate: float) -> list[Verdict]:
    cooling = coverage.reasons[Reason.COOLING_DOWN.value]
    with_text = coverage.with_text
    invalid = _count(coverage, INVALID)
    placeholders = _count(coverage, PLACEHOLDERS)
    rate = cooling / with_text if with_text else 0.0
    return [
        Verdict(
            "embedding_coverage",
            coverage.needing_work == 0,
            f"{coverage.covered}/{with_text} rows with text covered ({coverage.percent:.1f}%)"
            + (f"; {cooling} failed and cooling down" if cooling else ""),
            {
                "rows": coverage.rows,
                "rows_with_text": with_text,
                "rows_covered": coverage.covered,
                "rows_missing": coverage.needing_work,
                "rows_failed_cooling_down": cooling,
                "coverage_percent": round(coverage.percent, 2),
                "reasons": dict(coverage.reasons),
            },
        ),
        Verdict(
            "vectors_valid",
            not invalid,
            "every stored vector has the configured dimension and finite values"
            if not invalid
            else f"{sum(invalid.values())} stored vectors are unusable: {invalid}",
            {"rows_invalid": sum(invalid.values()), **invalid},
        ),
        Verdict(
            "no_placeholders",
            not placeholders,
            "no placeholder vector left" if not placeholders else f"placeholders left: {placeholders}",
            {"rows_placeholder": sum(placeholders.values()), **placeholders},
        ),
        Verdict(
            "failure_rate",
            rate <= max_failure_rate,
            f"{cooling} of {with_text} rows failed ({100 * rate:.2f}%; at most {100 * max_failure_rate:g}%)",
            {"rows_failed": cooling, "failure_rate": round(rate, 6), "max_failure_rate": max_failure_rate},
        ),
    ]
