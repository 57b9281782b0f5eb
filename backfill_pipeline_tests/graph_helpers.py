"""Running a dataset's graph for one partition against a real Dagster instance, and reading its metadata."""

from __future__ import annotations

import dagster as dg

from backfill_pipeline.config import BackfillConfig
from backfill_pipeline.definitions import build_definitions, job_name
from backfill_pipeline.partitions import partition_activity, register_partitions
from backfill_pipeline.stores import open_store


def register(config: BackfillConfig, name: str, instance: dg.DagsterInstance) -> list[str]:
    with open_store(name, config.datasets[name]) as store:
        keys = [k for k, _ in partition_activity(store, config.datasets[name])]
    register_partitions(instance, name, keys)
    return keys


def run_partition(
    config: BackfillConfig, name: str, key: str, instance: dg.DagsterInstance, **detection: object
) -> dg.ExecuteInProcessResult:
    job = build_definitions(config).resolve_job_def(job_name(name))
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
