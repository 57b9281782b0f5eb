"""The new-rows sensor and the refresh schedule, evaluated against a real instance and database."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from pathlib import Path

import dagster as dg

from backfill_pipeline.config import load_config, parse_config
from backfill_pipeline.coverage import partition_coverage
from backfill_pipeline.lib import backfill_definitions
from backfill_pipeline.partitions import partition_spec
from backfill_pipeline.stores import open_store

from .conftest import demo_config_dict
from .graph_helpers import register, run_partition, schedule_tick, sensor_tick


def _apply(result, instance: dg.DagsterInstance) -> None:
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


def _needing_work(store, dataset, key: str) -> int:
    return partition_coverage(store, dataset, partition_spec(key, dataset, store.rows)).needing_work


def _add_rows(db: Path, ids: range) -> None:
    conn = sqlite3.connect(db)
    conn.executemany(
        "INSERT INTO job_postings (id, title, company, description) VALUES (?, ?, ?, ?)",
        [(i, "Data Engineer", "Acme", f"Build pipelines with Python and SQL, posting {i}.") for i in ids],
    )
    conn.commit()
    conn.close()


def test_sensor_registers_partitions_and_requests_runs_once(demo_db: Path, demo_config_path: Path, instance) -> None:
    config = load_config(demo_config_path)
    defs = backfill_definitions(config)
    sensor = "jobs_new_rows_sensor"

    first = sensor_tick(defs, sensor, instance, None)
    keys = ["0000000000-0000000099", "0000000100-0000000199", "0000000200-0000000299", "0000000300-0000000399"]
    assert [list(r.partition_keys) for r in first.dynamic_partitions_requests] == [keys]  # all holding rows
    # the first tick runs every partition holding rows that need work, as a run's detection counts them
    with open_store("jobs", config.datasets["jobs"]) as store:
        store.migrate()
        needing = [k for k in keys if _needing_work(store, config.datasets["jobs"], k)]
    assert needing == keys[:3]  # row 300 alone is up to date
    assert [r.partition_key for r in first.run_requests] == needing
    assert json.loads(first.cursor) == {"mode": "id", "id": 300}
    _apply(first, instance)

    same = sensor_tick(defs, sensor, instance, first.cursor)
    assert not same.run_requests and "no rows with id > 300" in same.skip_message

    _add_rows(demo_db, range(301, 306))  # into the last partition
    _add_rows(demo_db, range(450, 452))  # a new partition
    grown = sensor_tick(defs, sensor, instance, first.cursor)
    assert [list(r.partition_keys) for r in grown.dynamic_partitions_requests] == [["0000000400-0000000499"]]
    assert [(r.partition_key, r.run_key) for r in grown.run_requests] == [
        ("0000000300-0000000399", "jobs:0000000300-0000000399@305"),
        ("0000000400-0000000499", "jobs:0000000400-0000000499@451"),
    ]
    assert json.loads(grown.cursor) == {"mode": "id", "id": 451}
    _apply(grown, instance)
    assert instance.get_dynamic_partitions("jobs_partitions") == [*keys, "0000000400-0000000499"]

    # the same state from an older cursor yields the same run keys: Dagster drops them as duplicates
    again = sensor_tick(defs, sensor, instance, first.cursor)
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in grown.run_requests]
    assert not again.dynamic_partitions_requests


def test_sensor_on_archive_partitions(tmp_path: Path, instance) -> None:
    db = tmp_path / "docs.sqlite"
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE documents (id INTEGER PRIMARY KEY, archive TEXT, content TEXT, embedding TEXT, "
        "content_hash TEXT, embedding_model TEXT, embedded_at TEXT)"
    )
    conn.executemany(
        "INSERT INTO documents (id, archive, content) VALUES (?, ?, ?)",
        [(i, "gjeldende-lover.tar.bz2" if i < 6 else "Forskrifter 2024.tar.bz2", f"Lov nr {i}") for i in range(1, 11)],
    )
    conn.commit()
    conn.close()
    config = parse_config(
        {
            "datasets": {
                "docs": {
                    "database_url": f"sqlite:///{db}",
                    "table": "documents",
                    "archive_column": "archive",
                    "text": {"columns": ["content"]},
                    "embedding": {"dimension": 64},
                    "partitioning": {"kind": "archive"},
                }
            }
        }
    )
    defs = backfill_definitions(config)
    sensor = "docs_new_rows_sensor"
    first = sensor_tick(defs, sensor, instance, None)
    assert list(first.dynamic_partitions_requests[0].partition_keys) == [
        "gjeldende-lover-tar-bz2",
        "forskrifter-2024-tar-bz2",
    ]
    _apply(first, instance)
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO documents (id, archive, content) VALUES (11, 'nye-lover.tar.bz2', 'Ny lov')")
    conn.commit()
    conn.close()
    grown = sensor_tick(defs, sensor, instance, first.cursor)
    assert [r.partition_key for r in grown.run_requests] == ["nye-lover-tar-bz2"]
    _apply(grown, instance)
    with __import__("backfill_pipeline.stores", fromlist=["open_store"]).open_store(
        "docs", config.datasets["docs"]
    ) as s:
        s.migrate()
    result = run_partition(config, "docs", "forskrifter-2024-tar-bz2", instance)
    written = [
        e
        for e in result.get_asset_materialization_events()
        if e.event_specific_data.materialization.asset_key.path[-1] == "written_table"
    ][0]
    assert written.event_specific_data.materialization.metadata["rows_written"].value == 5


def test_schedule_requests_partitions_needing_work_capped(demo_db: Path, tmp_path: Path, instance) -> None:
    data = demo_config_dict(demo_db)
    data["datasets"]["jobs"]["schedule"] = {"cron": "0 */6 * * *", "max_runs_per_tick": 2}
    config = parse_config(data)
    with open_store("jobs", config.datasets["jobs"]) as store:
        store.migrate()
    keys = register(config, "jobs", instance)
    run_partition(config, "jobs", keys[3], instance)  # the newest partition is now up to date
    defs = backfill_definitions(config)
    assert defs.resolve_schedule_def("jobs_refresh_schedule").cron_schedule == "0 */6 * * *"
    requests = schedule_tick(defs, "jobs_refresh_schedule", instance, datetime(2026, 1, 1, 6)).run_requests
    assert [r.partition_key for r in requests] == [keys[2], keys[1]]  # newest first, capped at 2, skipping keys[3]
    assert all(int(r.tags["rows_pending"]) > 0 for r in requests)

    for key in keys[:3]:
        run_partition(config, "jobs", key, instance)
    idle = schedule_tick(defs, "jobs_refresh_schedule", instance, datetime(2026, 1, 1, 6))
    assert not idle.run_requests and "no partition holds rows needing work" in idle.skip_message
