"""Dagster's own storage on Postgres, configured by the project's production dagster.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from backfill_pipeline.cli import set_pool_limits
from backfill_pipeline.config import load_config
from backfill_pipeline.lib.assets import EMBEDDING_POOL, ENRICHMENT_POOL

from .conftest import REPO
from .graph_helpers import metadata, register, run_partition
from .pg import create_database, drop_database


@pytest.fixture
def postgres_instance(tmp_path: Path, pg_server_url: str, monkeypatch: pytest.MonkeyPatch):
    url = create_database(pg_server_url)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", url.replace("postgresql://", "postgresql+psycopg2://", 1))
    instance = dg.DagsterInstance.from_config(str(home))
    yield instance
    instance.dispose()
    drop_database(pg_server_url, url)


def test_production_yaml_settings(postgres_instance: dg.DagsterInstance) -> None:
    settings = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    assert "default_limit" not in settings["concurrency"]["pools"]
    assert type(postgres_instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(postgres_instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert type(postgres_instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    assert postgres_instance.run_monitoring_enabled and postgres_instance.run_retries_enabled
    set_pool_limits(postgres_instance, {EMBEDDING_POOL: 3, ENRICHMENT_POOL: 2})
    assert postgres_instance.event_log_storage.get_concurrency_info(EMBEDDING_POOL).slot_count == 3
    assert postgres_instance.event_log_storage.get_concurrency_info(ENRICHMENT_POOL).slot_count == 2


def test_partition_materialized_through_a_postgres_instance(
    postgres_instance: dg.DagsterInstance, demo_db: Path, demo_config_path: Path
) -> None:
    config = load_config(demo_config_path)
    keys = register(config, "jobs", postgres_instance)
    result = run_partition(config, "jobs", keys[0], postgres_instance)
    assert result.success

    run = postgres_instance.get_run_by_id(result.run_id)
    assert run.status == dg.DagsterRunStatus.SUCCESS and run.tags["dagster/partition"] == keys[0]
    assert postgres_instance.get_dynamic_partitions("jobs_partitions") == keys
    event = postgres_instance.get_latest_materialization_event(dg.AssetKey(["jobs", "written_table"]))
    assert event.run_id == result.run_id
    stored = event.asset_materialization.metadata["rows_written"].value
    assert stored == metadata(result, "written_table")["rows_written"] > 0
    records = postgres_instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(["jobs", "embeddings"]), asset_partitions=[keys[0]]), limit=5
    ).records
    assert len(records) == 1 and records[0].partition_key == keys[0]
