"""The refresh schedule: every few hours, runs for the partitions that hold rows needing work.

Written by hand because ``build_schedule_from_partitioned_job`` rejects dynamic partitions. Newest
partitions are looked at first and the number of runs per tick is capped, so a large table is caught up
over several ticks without flooding the run queue.
"""

from typing import TYPE_CHECKING

import dagster as dg

from .config import DatasetConfig
from .coverage import partition_coverage
from .detection import Reason
from .partitions import partition_spec

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from .resources import database_resource


def build_refresh_schedule(
    name: str,
    dataset: DatasetConfig,
    job: "UnresolvedAssetJobDefinition",
    partitions_def: dg.DynamicPartitionsDefinition,
) -> dg.ScheduleDefinition:
    spec = dataset.schedule

    @dg.schedule(
        name=f"{name}_refresh_schedule",
        job=job,
        cron_schedule=spec.cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Runs partitions of {dataset.table} that hold rows needing work, at most "
        f"{spec.max_runs_per_tick} per tick, newest first.",
    )
    def refresh_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
        keys = context.instance.get_dynamic_partitions(partitions_def.name)
        tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
        requests: list[dg.RunRequest] = []
        with database_resource(dataset).open(name, dataset) as store:
            for key in reversed(keys):
                coverage = partition_coverage(store, dataset, partition_spec(key, dataset, store))
                pending = coverage.needing_work - coverage.reasons[Reason.COOLING_DOWN.value]
                if pending > 0:
                    requests.append(
                        dg.RunRequest(
                            partition_key=key, run_key=f"{name}:{key}@{tick}", tags={"rows_pending": str(pending)}
                        )
                    )
                    if len(requests) >= spec.max_runs_per_tick:
                        break
        if not requests:
            return dg.SkipReason(f"all {len(keys)} partitions are up to date")
        return requests

    return refresh_schedule
