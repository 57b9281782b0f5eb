"""The new-rows sensor: registers partitions as ids grow and requests runs for partitions that gained rows.

Its cursor is the largest id seen. Run keys carry the partition's largest id, so a tick that sees the
same state again requests nothing new.
"""

import dagster as dg

from ..config import DatasetConfig
from ..partitions import partition_activity
from .resources import ResourceKeys


def new_rows_result(
    name: str,
    activity: list[tuple[str, int]],
    registered: set[str],
    after_id: int | None,
    partitions_def: dg.DynamicPartitionsDefinition,
) -> dg.SensorResult | dg.SkipReason:
    """What a tick returns, given each partition's largest id above the cursor and the registered keys."""
    if not activity:
        return dg.SkipReason(f"no rows with id > {after_id}")
    new_keys = [k for k, _ in activity if k not in registered]
    # On the first tick every partition "gained" rows; only the unregistered ones are news then.
    gained = activity if after_id is not None else [(k, m) for k, m in activity if k not in registered]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=k, run_key=f"{name}:{k}@{m}") for k, m in gained],
        cursor=str(max(m for _, m in activity)),
        dynamic_partitions_requests=[partitions_def.build_add_request(new_keys)] if new_keys else [],
    )


def build_new_rows_sensor(
    name: str, dataset: DatasetConfig, job_name: str, partitions_def: dg.DynamicPartitionsDefinition
) -> dg.SensorDefinition:
    keys = ResourceKeys.of(name)
    partitions = partitions_def.name or ""

    @dg.sensor(
        name=f"{name}_new_rows_sensor",
        job_name=job_name,
        minimum_interval_seconds=dataset.sensor.interval_seconds,
        default_status=dg.DefaultSensorStatus.STOPPED,
        required_resource_keys=keys.database_only(),
        description=f"Registers new partitions of {dataset.table} and requests runs for partitions that "
        "gained rows since the last tick.",
    )
    def new_rows_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        after_id = int(context.cursor) if context.cursor else None
        with keys.resolve(context.resources).database.open(dataset) as store:
            activity = partition_activity(store.rows, dataset, after_id)
        registered = set(context.instance.get_dynamic_partitions(partitions))
        result = new_rows_result(name, activity, registered, after_id, partitions_def)
        if isinstance(result, dg.SensorResult):
            new = sum(len(list(r.partition_keys or [])) for r in result.dynamic_partitions_requests or [])
            context.log.info(f"{new} new partitions, {len(result.run_requests or [])} partitions with new rows")
        return result

    return new_rows_sensor
