"""The code location: one asset graph, job, sensor, schedule and coverage check per configured dataset."""

import dagster as dg

from .assets import IO_MANAGER_KEY, build_dataset_assets
from .checks import build_coverage_check
from .config import BackfillConfig, load_config
from .io_managers import ParquetIOManager
from .partitions import partitions_def_for
from .resources import dataset_resources
from .schedules import build_refresh_schedule
from .sensors import build_new_rows_sensor


def job_name(dataset: str) -> str:
    return f"{dataset}_backfill_job"


def build_definitions(config: BackfillConfig) -> dg.Definitions:
    assets, checks, jobs, sensors, schedules = [], [], [], [], []
    resources: dict[str, object] = {IO_MANAGER_KEY: ParquetIOManager()}
    for name, dataset in config.datasets.items():
        partitions_def = partitions_def_for(name)
        dataset_assets = build_dataset_assets(name, dataset, partitions_def)
        assets += dataset_assets
        checks.append(build_coverage_check(name, dataset, partitions_def))
        job = dg.define_asset_job(
            job_name(name),
            selection=dg.AssetSelection.assets(*dataset_assets),
            description=f"Backfill {dataset.table}: detect, enrich, embed and write one partition.",
        )
        jobs.append(job)
        if dataset.sensor.enabled:
            sensors.append(build_new_rows_sensor(name, dataset, job, partitions_def))
        if dataset.schedule.enabled:
            schedules.append(build_refresh_schedule(name, dataset, job, partitions_def))
        resources.update(dataset_resources(name, dataset))
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        resources=resources,
        # A partition's steps form a chain, so a process per step would only add start-up time; runs of
        # different partitions still execute in parallel, each in its own process.
        executor=dg.in_process_executor,
    )


defs = build_definitions(load_config())
