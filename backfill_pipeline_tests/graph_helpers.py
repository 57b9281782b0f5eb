"""Running a dataset's graph for one partition against a real Dagster instance, and reading its metadata."""

from __future__ import annotations

from datetime import datetime

import dagster as dg

from backfill_pipeline.config import BackfillConfig
from backfill_pipeline.lib import backfill_definitions, job_name
from backfill_pipeline.partitions import partition_activity, register_partitions
from backfill_pipeline.stores import open_store


def register(config: BackfillConfig, name: str, instance: dg.DagsterInstance) -> list[str]:
    with open_store(name, config.datasets[name]) as store:
        keys = [k for k, _ in partition_activity(store.rows, config.datasets[name])]
    register_partitions(instance, name, keys)
    return keys


def run_partition(
    config: BackfillConfig, name: str, key: str, instance: dg.DagsterInstance, **detection: object
) -> dg.ExecuteInProcessResult:
    job = backfill_definitions(config).resolve_job_def(job_name(name))
    run_config = {"ops": {f"{name}__detected_placeholders": {"config": detection}}} if detection else None
    return job.execute_in_process(partition_key=key, instance=instance, run_config=run_config)


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, object]:
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        if mat.asset_key.path[-1] == asset:
            return {k: v.value for k, v in mat.metadata.items()}
    raise KeyError(f"{asset} was not materialized")


def materialized_assets(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.event_specific_data.materialization.asset_key.path[-1] for e in result.get_asset_materialization_events()}


def sensor_tick(defs: dg.Definitions, name: str, instance: dg.DagsterInstance, cursor: str | None = None):
    """One evaluation of sensor ``name`` with the resources bound from ``defs``, as the code server does it
    (resources are built for the tick, so a database URL held in an environment variable is read then)."""
    resources = defs.get_repository_def().get_top_level_resources()
    # closed here: the instance the context opens from the ref must not be torn down by the garbage collector
    # later, which would leave Dagster's current defs-state storage pointing at a disposed instance
    with dg.build_sensor_context(
        instance_ref=instance.get_ref(), cursor=cursor, definitions=defs, resources=resources
    ) as context:
        return defs.resolve_sensor_def(name).evaluate_tick(context)


def schedule_tick(defs: dg.Definitions, name: str, instance: dg.DagsterInstance, when: datetime):
    """One evaluation of schedule ``name`` at ``when``, with the resources bound from ``defs``."""
    repository = defs.get_repository_def()
    context = dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=when,
        repository_def=repository,
        resources=repository.get_top_level_resources(),
    )
    return defs.resolve_schedule_def(name).evaluate_tick(context)
