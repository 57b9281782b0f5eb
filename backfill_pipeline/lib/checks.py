"""Asset checks: after a partition is written, no row with text should still need work."""

import warnings

import dagster as dg

from ..config import DatasetConfig
from ..coverage import Coverage, partition_coverage
from ..detection import Reason
from ..partitions import partition_spec
from .resources import ResourceKeys


def coverage_result(coverage: Coverage) -> dg.AssetCheckResult:
    cooling = coverage.reasons[Reason.COOLING_DOWN.value]
    missing = coverage.needing_work - cooling
    return dg.AssetCheckResult(
        passed=missing == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{coverage.covered}/{coverage.with_text} rows with text covered ({coverage.percent:.1f}%)",
        metadata={
            "rows": coverage.rows,
            "rows_with_text": coverage.with_text,
            "rows_covered": coverage.covered,
            "rows_missing": missing,
            "rows_failed_cooling_down": cooling,
            "coverage_percent": round(coverage.percent, 2),
            "reasons": dg.MetadataValue.json(dict(coverage.reasons)),
        },
    )


def build_coverage_check(
    name: str, dataset: DatasetConfig, partitions_def: dg.PartitionsDefinition
) -> dg.AssetChecksDefinition:
    keys = ResourceKeys.of(name)
    # Partitioned asset checks are a preview feature in Dagster 1.13; the warning says nothing actionable.
    warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec.*")

    @dg.asset_check(
        asset=dg.AssetKey([name, "written_table"]),
        name="embedding_coverage",
        partitions_def=partitions_def,
        required_resource_keys=keys.database_only(),
        description="Every row with text in the partition holds a valid embedding of the configured model "
        "and dimension, for its current text, and its enrichment; rows that failed and are cooling down "
        "are reported, not counted as missing.",
    )
    def embedding_coverage(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        with keys.resolve(context.resources).database.open(dataset) as store:
            part = partition_spec(context.partition_key, dataset, store.rows)
            return coverage_result(partition_coverage(store, dataset, part))

    return embedding_coverage
