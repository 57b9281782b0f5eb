"""The written table's checks, after each partition is written: one reading of the partition's coverage
gives four verdicts (:mod:`backfill_pipeline.verdicts`).

``vectors_valid`` and ``no_placeholders`` fail with ERROR severity (red in the UI), ``embedding_coverage``
and ``failure_rate`` warn. None is blocking: the write already happened and its rows are paid for, and a
run that leaves work for later (``--limit``, rows cooling down) must still succeed.
"""

import warnings
from collections.abc import Iterator

import dagster as dg

from ..config import DatasetConfig
from ..coverage import partition_coverage
from ..partitions import partition_spec
from ..verdicts import verdicts
from .resources import ResourceKeys

ERRORS = ("vectors_valid", "no_placeholders")
DESCRIPTIONS = {
    "embedding_coverage": "Every row with text holds a current embedding of the configured model and dimension, "
    "and its enrichment; rows that failed and are cooling down are not covered.",
    "vectors_valid": "Every stored vector has the configured dimension and finite values.",
    "no_placeholders": "No all-zero, constant or sequential placeholder vector is left.",
    "failure_rate": "Rows that failed are at most checks.max_failure_rate of the rows with text.",
}


def check_specs(name: str, partitions_def: dg.PartitionsDefinition) -> list[dg.AssetCheckSpec]:
    written = dg.AssetKey([name, "written_table"])
    return [
        dg.AssetCheckSpec(
            check,
            asset=written,
            description=description,
            partitions_def=partitions_def,
        )
        for check, description in DESCRIPTIONS.items()
    ]


def build_written_table_checks(
    name: str, dataset: DatasetConfig, partitions_def: dg.PartitionsDefinition
) -> dg.AssetChecksDefinition:
    keys = ResourceKeys.of(name)
    # Partitioned asset checks are a preview feature in Dagster 1.13; the warning says nothing actionable.
    warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec.*")

    @dg.multi_asset_check(
        specs=check_specs(name, partitions_def),
        name=f"{name}_written_table_checks",
        required_resource_keys=keys.database_only(),
    )
    def written_table_checks(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
        with keys.resolve(context.resources).database.open(dataset) as store:
            part = partition_spec(context.partition_key, dataset, store.rows)
            coverage = partition_coverage(store, dataset, part)
        for verdict in verdicts(coverage, dataset.checks.max_failure_rate):
            yield dg.AssetCheckResult(
                check_name=verdict.check,
                asset_key=dg.AssetKey([name, "written_table"]),
                passed=verdict.passed,
                severity=dg.AssetCheckSeverity.ERROR if verdict.check in ERRORS else dg.AssetCheckSeverity.WARN,
                description=verdict.description,
                metadata={
                    k: dg.MetadataValue.json(v) if isinstance(v, dict) else v for k, v in verdict.metadata.items()
                },
            )

    return written_table_checks
