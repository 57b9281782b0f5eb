"""The refresh schedule: every few hours, runs for the partitions that hold rows needing work.

Those partitions come from one aggregate query over the table (:func:`..partitions.pending_partitions`),
not a read per partition, so a tick costs one statement however many partitions there are. Newest
partitions come first and the runs per tick are capped, so a large table is caught up over several ticks
without flooding the run queue. Time-partitioned datasets take the schedule of their partitioned job
instead (``build_schedule_from_partitioned_job`` rejects dynamic partitions, so the others need this).
"""

import dagster as dg
from dagster._core.definitions.partitions.partitioned_schedule import UnresolvedPartitionedAssetScheduleDefinition
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from ..config import DatasetConfig
from ..partitions import pending_partitions
from .resources import ResourceKeys


def refresh_requests(name: str, pending: list[tuple[str, int]], cap: int, tick: str) -> list[dg.RunRequest]:
    """At most ``cap`` runs, newest partitions first, each tagged with its rows pending."""
    newest_first = sorted(pending, key=lambda item: item[0], reverse=True)[:cap]
    return [
        dg.RunRequest(partition_key=key, run_key=f"{name}:{key}@{tick}", tags={"rows_pending": str(rows)})
        for key, rows in newest_first
    ]


def build_refresh_schedule(
    name: str, dataset: DatasetConfig, job: UnresolvedAssetJobDefinition
) -> dg.ScheduleDefinition | UnresolvedPartitionedAssetScheduleDefinition:
    if dataset.partitioning.kind == "time":
        return dg.build_schedule_from_partitioned_job(
            job,
            name=f"{name}_refresh_schedule",
            default_status=dg.DefaultScheduleStatus.STOPPED,
            description=f"Runs the current {dataset.partitioning.granularity} partition of {dataset.table}.",
        )
    spec = dataset.schedule
    keys = ResourceKeys.of(name)

    @dg.schedule(
        name=f"{name}_refresh_schedule",
        job_name=job.name,
        cron_schedule=spec.cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        required_resource_keys=keys.database_only(),
        description=f"Runs partitions of {dataset.table} that hold rows needing work, at most "
        f"{spec.max_runs_per_tick} per tick, newest first.",
    )
    def refresh_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
        tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
        with keys.resolve(context.resources).database.open(dataset) as store:
            pending = pending_partitions(store.rows, dataset)
        if not pending:
            return dg.SkipReason("no partition holds rows needing work")
        return refresh_requests(name, pending, spec.max_runs_per_tick, tick)

    return refresh_schedule
