"""The dataset's summary asset: unpartitioned, refreshed by a declarative automation condition whenever
partitions of the written table land, shown in the UI as Markdown and as plots of its numbers."""

import dagster as dg

from ..config import DatasetConfig
from ..summary import dataset_summary
from .resources import ResourceKeys

PAID_ASSETS = ("llm_enrichment", "embeddings")


def spend_to_date(instance: dg.DagsterInstance, name: str) -> float:
    """What the dataset's provider steps have cost, summed over their materializations."""
    total = 0.0
    for asset in PAID_ASSETS:
        cursor = None
        while True:
            page = instance.fetch_materializations(dg.AssetKey([name, asset]), limit=1000, cursor=cursor)
            for record in page.records:
                cost = (
                    record.asset_materialization.metadata.get("provider_cost_usd")
                    if record.asset_materialization
                    else None
                )
                total += float(cost.value) if cost is not None else 0.0  # type: ignore[arg-type]
            if not page.has_more:
                break
            cursor = page.cursor
    return total


def build_summary_asset(name: str, dataset: DatasetConfig) -> dg.AssetsDefinition:
    keys = ResourceKeys.of(name)

    @dg.asset(
        name="backfill_summary",
        key_prefix=[name],
        group_name=f"{name}_summary",  # unpartitioned: apart, so `group:{name}` selects one partitioned graph
        deps=[dg.AssetKey([name, "written_table"])],
        automation_condition=dg.AutomationCondition.any_deps_updated() & ~dg.AutomationCondition.in_progress(),
        required_resource_keys=keys.database_only(),
        kinds={dataset.store_kind},
        description=f"The whole of {dataset.table}: coverage per partition (rows cooling down after a failure "
        "are not covered), failures by class and spend to date; refreshed after partitions land.",
    )
    def backfill_summary(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        spend = spend_to_date(context.instance, name)
        with keys.resolve(context.resources).database.open(dataset) as store:
            summary = dataset_summary(name, dataset, store, spend)
        context.log.info(summary.markdown().splitlines()[0])
        return dg.MaterializeResult(metadata={**summary.metadata(), "report": dg.MetadataValue.md(summary.markdown())})

    return backfill_summary
