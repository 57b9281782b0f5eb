"""The new-rows sensor: registers partitions as ids grow and requests runs for partitions that gained rows.

Its cursor is the largest id seen. Run keys carry the partition's largest id, so a tick that sees the
same state again requests nothing new.
"""

from typing import TYPE_CHECKING

import dagster as dg

from .config import DatasetConfig
from .partitions import partition_activity

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from .resources import DatabaseResource, database_resource


def build_new_rows_sensor(
    name: str,
    dataset: DatasetConfig,
    job: "UnresolvedAssetJobDefinition",
    partitions_def: dg.DynamicPartitionsDefinition,
) -> dg.SensorDefinition:
    @dg.sensor(
        name=f"{name}_new_rows_sensor",
        job=job,
        minimum_interval_seconds=dataset.sensor.interval_seconds,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=f"Registers new partitions of {dataset.table} and requests runs for partitions that "
        "gained rows since the last tick.",
    )
    def new_rows_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        after_id = int(context.cursor) if context.cursor else None
        db: DatabaseResource = database_resource(dataset)
        with db.open(name, dataset) as store:
            activity = partition_activity(store, dataset, after_id)
        if not activity:
            return dg.SkipReason(f"no rows with id > {after_id}")
        existing = set(context.instance.get_dynamic_partitions(partitions_def.name))
        new_keys = [k for k, _ in activity if k not in existing]
        # On the first tick every partition "gained" rows; only the unregistered ones are news then.
        gained = activity if after_id is not None else [(k, m) for k, m in activity if k not in existing]
        cursor = str(max(m for _, m in activity))
        context.log.info(f"{len(new_keys)} new partitions, {len(gained)} partitions with new rows")
        return dg.SensorResult(
            run_requests=[dg.RunRequest(partition_key=k, run_key=f"{name}:{k}@{m}") for k, m in gained],
            cursor=cursor,
            dynamic_partitions_requests=[partitions_def.build_add_request(new_keys)] if new_keys else [],
        )

    return new_rows_sensor
