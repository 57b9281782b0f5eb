"""The change sensor: requests runs for the partitions holding new, edited or deleted rows, and registers
new dynamic partitions. How changes are found is :mod:`backfill_pipeline.changes`; run keys name the
change seen, so a tick that sees the same state again requests nothing new."""

import dagster as dg

from ..changes import sensor_tick
from ..config import DatasetConfig
from ..partitions import is_dynamic, partition_keys
from .resources import ResourceKeys


def build_new_rows_sensor(
    name: str, dataset: DatasetConfig, job_name: str, partitions_def: dg.PartitionsDefinition
) -> dg.SensorDefinition:
    keys = ResourceKeys.of(name)

    @dg.sensor(
        name=f"{name}_new_rows_sensor",
        job_name=job_name,
        minimum_interval_seconds=dataset.sensor.interval_seconds,
        default_status=dg.DefaultSensorStatus.STOPPED,
        required_resource_keys=keys.database_only(),
        description=f"Requests runs for the partitions of {dataset.table} holding new, edited or deleted rows "
        "(on its first tick: every partition holding rows that need work).",
    )
    def new_rows_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        registered = set(partition_keys(context.instance, name, dataset)) if is_dynamic(dataset) else set()
        with keys.resolve(context.resources).database.open(dataset) as store:
            tick = sensor_tick(name, dataset, store, context.cursor, registered)
        context.log.info(f"{tick.note}; {len(tick.new_keys)} new partitions, {len(tick.runs)} runs requested")
        if not tick.runs and tick.cursor is None:
            return dg.SkipReason(tick.note)
        add = []
        if isinstance(partitions_def, dg.DynamicPartitionsDefinition) and tick.new_keys:
            add = [partitions_def.build_add_request(tick.new_keys)]
        return dg.SensorResult(
            run_requests=[dg.RunRequest(partition_key=k, run_key=run_key) for k, run_key in tick.runs],
            cursor=tick.cursor or context.cursor,
            dynamic_partitions_requests=add,
        )

    return new_rows_sensor
