"""One ``dg.Definitions`` per dataset, built by one factory, and the merge of them all.

A dataset's definitions hold everything that is its own (assets, coverage check, job, sensor, schedule,
its database and provider-key resources); what all datasets share (the Parquet IO manager, the
executor) is defined once, in :func:`backfill_definitions`.
"""

from __future__ import annotations

import importlib

import dagster as dg

from ..config import BackfillConfig, ConfigError, DatasetConfig
from ..config.models import ExecutionSpec
from ..partitions import partitions_def_for
from .assets import IO_MANAGER_KEY, build_dataset_assets
from .checks import build_written_table_checks
from .io_managers import ParquetIOManager
from .resources import dataset_resources
from .schedules import build_refresh_schedule
from .sensors import build_new_rows_sensor
from .summary_asset import build_summary_asset


def job_name(dataset: str) -> str:
    return f"{dataset}_backfill_job"


def dataset_definitions(name: str, dataset: DatasetConfig) -> dg.Definitions:
    """Everything one dataset needs, under its own names and resource keys."""
    partitions_def = partitions_def_for(name, dataset)
    assets = build_dataset_assets(name, dataset, partitions_def)
    job = dg.define_asset_job(
        job_name(name),
        selection=dg.AssetSelection.assets(*assets),
        description=f"Backfill {dataset.table}: detect, enrich, embed and write one partition.",
    )
    sensors = [build_new_rows_sensor(name, dataset, job_name(name), partitions_def)] if dataset.sensor.enabled else []
    schedules = [build_refresh_schedule(name, dataset, job)] if dataset.schedule.enabled else []
    return dg.Definitions(
        assets=[*assets, build_summary_asset(name, dataset)],  # the summary is not partitioned: not in the job
        asset_checks=[build_written_table_checks(name, dataset, partitions_def)],
        jobs=[job],
        sensors=sensors,
        schedules=schedules,
        resources=dataset_resources(name, dataset),
    )


def executor_of(name: str, config: dict | None = None) -> dg.ExecutorDefinition:
    """The executor the config names (Dagster's own two, or ``module:attribute`` of a deployment's), with
    its own config when given."""
    found = _executor(name)
    return found.configured(config, name=f"{found.name}_configured") if config else found


def _executor(name: str) -> dg.ExecutorDefinition:
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        return dg.multiprocess_executor
    module, attribute = name.split(":")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"execution.executor {name!r} cannot be loaded ({exc}); is its package installed?") from None
    if not isinstance(found, dg.ExecutorDefinition):
        raise ConfigError(f"execution.executor {name!r} is a {type(found).__name__}, not a Dagster executor")
    return found


def shared_definitions(execution: ExecutionSpec | None = None) -> dg.Definitions:
    """What every dataset shares, defined once: two datasets may not bind one key to two resources."""
    execution = execution or ExecutionSpec()
    return dg.Definitions(
        resources={IO_MANAGER_KEY: ParquetIOManager(base_dir=execution.intermediates_url)},
        # In-process by default: a partition's steps form a chain, so a process per step would only add
        # start-up time; runs of different partitions still execute in parallel, each in its own process.
        executor=executor_of(execution.executor, execution.executor_config),
    )


def backfill_definitions(config: BackfillConfig) -> dg.Definitions:
    return dg.Definitions.merge(
        shared_definitions(config.execution),
        *(dataset_definitions(name, ds) for name, ds in config.datasets.items()),
    )
