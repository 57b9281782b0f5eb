"""The UI and the daemon, for real, on a table keyed by UUID as Supabase's are: a partition backfill
launched through GraphQL brings it to 100%; then rows are inserted and edited, the sensors turned on
through GraphQL, and the daemon brings them in without anyone asking; the summary asset, refreshed by
its automation condition, shows the new totals."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from backfill_pipeline.text import content_hash

from .test_postgres_scenarios import posting, sql
from .test_production_backfill import _backfill_status, _graphql, _launch, _project, _services

START_SENSOR = """mutation($selector: SensorSelector!) { startSensor(sensorSelector: $selector) {
  __typename ... on Sensor { sensorState { status } } ... on PythonError { message } } }"""


def _start(port: int, sensor: str) -> None:
    selector = {"repositoryLocationName": "backfill_pipeline", "repositoryName": "__repository__"}
    started = _graphql(port, START_SENSOR, {"selector": {**selector, "sensorName": sensor}})["startSensor"]
    assert started["__typename"] == "Sensor" and started["sensorState"]["status"] == "RUNNING", started


def _summary(home: Path, dagster_db: str, monkeypatch: pytest.MonkeyPatch) -> dict | None:
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", dagster_db.replace("postgresql", "postgresql+psycopg2", 1))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(["jobs", "backfill_summary"]))
    if event is None or event.asset_materialization is None:
        return None
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def _wait(what: str, done, timeout: float, logs: Path) -> None:
    deadline = time.time() + timeout
    while not done():
        assert time.time() < deadline, (
            f"{what}: not done in {timeout:.0f}s\n" + (logs / "daemon.out").read_text()[-4000:]
        )
        time.sleep(2)


def test_the_daemon_backfills_then_follows_inserts_and_edits(
    production, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, dagster_db, data_db = production
    env = _project(  # as Supabase tables are: UUID keys, in hash partitions
        production,
        tmp_path,
        rows=120,
        uuid_keys=True,
        partitioning={"kind": "hash", "buckets": 3},
        change_tracking={"trigger": True},
        sensor={"interval_seconds": 5},
    )
    with _services(env, tmp_path) as (port, logs):
        _start(port, "default_automation_condition_sensor")
        result = _launch(port, ["h0", "h1", "h2"])
        assert _backfill_status(port, result["backfillId"]) in ("COMPLETED", "COMPLETED_SUCCESS")
        _wait(
            "the summary after the backfill",
            lambda: (_summary(home, dagster_db, monkeypatch) or {}).get("rows_covered") == 120,
            180,
            logs,
        )

        with psycopg.connect(data_db, autocommit=True) as conn:
            conn.cursor().executemany(
                "INSERT INTO jobs_enriched (title, company, description) VALUES (%s,%s,%s)",
                [posting(i) for i in range(121, 126)],
            )
            edited_id = conn.execute("SELECT min(id::text) FROM jobs_enriched").fetchone()[0]
            conn.execute("UPDATE jobs_enriched SET title = 'Staff Data Engineer' WHERE id = %s", [edited_id])
        edited = sql(data_db, "SELECT title, company, description FROM jobs_enriched WHERE id = %s", [edited_id])[0]
        new_hash = content_hash(f"{edited[0]} at {edited[1]}\n\n{edited[2]}")
        _start(port, "jobs_new_rows_sensor")

        def caught_up() -> bool:
            missing = sql(data_db, "SELECT count(*) FROM jobs_enriched WHERE embedding IS NULL")[0][0]
            [(stored,)] = sql(data_db, "SELECT content_hash FROM jobs_enriched WHERE id = %s", [edited_id])
            return missing == 0 and stored == new_hash

        _wait("the sensor's runs", caught_up, 300, logs)
        _wait(
            "the summary's new totals",
            lambda: (_summary(home, dagster_db, monkeypatch) or {}).get("rows_covered") == 125,
            180,
            logs,
        )
    summary = _summary(home, dagster_db, monkeypatch)
    assert summary is not None
    assert summary["coverage_percent"] == 100.0 and summary["partitions"] == 3 and summary["rows"] == 125
    assert "| **all 3** | 125 |" in summary["report"]
    launched_by = sql(
        dagster_db,
        "SELECT count(*) FROM runs WHERE status = 'SUCCESS' AND strpos(run_body, 'jobs_new_rows_sensor') > 0",
    )[0][0]
    assert launched_by >= 1  # the partitions holding the new and the edited rows: nobody asked
