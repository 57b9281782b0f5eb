"""The refresh schedule: every few hours, runs for the partitions that hold rows needing work.

Written by hand because ``build_schedule_from_partitioned_job`` rejects dynamic partitions. Newest
partitions are looked at first and the number of runs per tick is capped, so a large table is caught up
over several ticks without flooding the run queue.
"""

from collections.abc import Iterable

import dagster as dg

from ..config import DatasetConfig
from ..coverage import partition_coverage
from ..detection import Reason
from ..partitions import partition_spec
from ..stores import Store
from .resources import ResourceKeys


def pending_partitions(store: Store, dataset: DatasetConfig, keys: Iterable[str], cap: int) -> list[tuple[str, int]]:
    """``(key, rows pending)`` of at most ``cap`` partitions with rows needing work, in the order of ``keys``."""
    found: list[tuple[str, int]] = []
    for key in keys:
        coverage = partition_coverage(store, dataset, partition_spec(key, dataset, store.rows))
        # rows cooling down after a failure, and rows whose text cannot be read, wait for someone, not a run
        waiting = coverage.reasons[Reason.COOLING_DOWN.value] + coverage.reasons[Reason.UNDECODABLE_TEXT.value]
        pending = coverage.needing_work - waiting
        if pending > 0:
            found.append((key, pending))
            if len(found) >= cap:
                break
    return found


def build_refresh_schedule(
    name: str, dataset: DatasetConfig, job_name: str, partitions_def: dg.DynamicPartitionsDefinition
) -> dg.ScheduleDefinition:
    spec = dataset.schedule
    keys = ResourceKeys.of(name)
    partitions = partitions_def.name or ""

    @dg.schedule(
        name=f"{name}_refresh_schedule",
        job_name=job_name,
        cron_schedule=spec.cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        required_resource_keys=keys.database_only(),
        description=f"Runs partitions of {dataset.table} that hold rows needing work, at most "
        f"{spec.max_runs_per_tick} per tick, newest first.",
    )
    def refresh_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
        registered = context.instance.get_dynamic_partitions(partitions)
        tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
        with keys.resolve(context.resources).database.open(dataset) as store:
            pending = pending_partitions(store, dataset, reversed(registered), spec.max_runs_per_tick)
        if not pending:
            return dg.SkipReason(f"all {len(registered)} partitions are up to date")
        return [
            dg.RunRequest(partition_key=key, run_key=f"{name}:{key}@{tick}", tags={"rows_pending": str(rows)})
            for key, rows in pending
        ]

    return refresh_schedule
