"""Tables as they are: text keys with ``updated_at`` tracking, time partitions with the job's own
schedule, NULL archives in a partition of their own, archive names as written on the command line."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest

from backfill_pipeline.config import ConfigError, parse_config
from backfill_pipeline.lib import backfill_definitions
from backfill_pipeline.partitions import NULL_ARCHIVE_KEY, hash_key, partition_activity
from backfill_pipeline.stores import open_store
from backfill_pipeline.stores.groups import hash_bucket

from .conftest import query, subprocess_env, write_config
from .graph_helpers import metadata, register, run_partition, sensor_tick

CLI = str(Path(sys.executable).parent / "backfill-pipeline")


def _dataset(db: Path, **extra: object) -> dict:
    base = {"database_url": f"sqlite:///{db}", "table": "docs", "text": {"columns": ["body"]}}
    return {**base, "embedding": {"dimension": 16}, **extra}


def _text_keyed(tmp_path: Path) -> Path:
    """The Dutch seed's job ids look like ``abc123``; rows carry an ``updated_at``."""
    db = tmp_path / "docs.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE docs (id TEXT PRIMARY KEY, body TEXT, updated_at TEXT)")
    conn.executemany(
        "INSERT INTO docs VALUES (?, ?, ?)",
        [(f"job{n:03d}x", f"Vacature {n}: data engineer", f"2026-01-01 10:00:{n % 60:02d}") for n in range(40)],
    )
    conn.commit()
    conn.close()
    return db


def test_text_keys_on_sqlite_follow_edits_by_updated_at(tmp_path: Path, instance) -> None:
    db = _text_keyed(tmp_path)
    partitioning = {"kind": "hash", "buckets": 8}
    tracking = {"updated_at_column": "updated_at"}
    config = parse_config({"datasets": {"docs": _dataset(db, partitioning=partitioning, change_tracking=tracking)}})
    with open_store("docs", config.datasets["docs"]) as store:
        store.migrate()
    defs = backfill_definitions(config)
    first = sensor_tick(defs, "docs_new_rows_sensor", instance)
    assert not first.dynamic_partitions_requests  # hash partitions are static: nothing to register
    keys = sorted({hash_key(hash_bucket(f"job{n:03d}x", 8), 8) for n in range(40)})
    assert sorted(r.partition_key for r in first.run_requests) == keys
    for r in first.run_requests:
        assert run_partition(config, "docs", r.partition_key, instance).success
    assert query(db, "SELECT count(*) FROM docs WHERE embedding IS NULL") == [(0,)]
    assert json.loads(first.cursor) == {"mode": "updated_at", "at": "2026-01-01 10:00:39", "key": "job039x"}

    assert not sensor_tick(defs, "docs_new_rows_sensor", instance, first.cursor).run_requests
    conn = sqlite3.connect(db)
    conn.execute("UPDATE docs SET body = 'Vacature 7: senior data engineer', updated_at = '2026-01-02 09:00:00' "
                 "WHERE id = 'job007x'")  # fmt: skip
    conn.execute(
        "INSERT INTO docs (id, body, updated_at) VALUES ('abc123', 'Vacature: ML engineer', '2026-01-02 09:00:00')"
    )
    conn.commit()
    conn.close()
    tick = sensor_tick(defs, "docs_new_rows_sensor", instance, first.cursor)
    changed = sorted({hash_key(hash_bucket(i, 8), 8) for i in ("job007x", "abc123")})
    assert sorted(r.partition_key for r in tick.run_requests) == changed
    assert json.loads(tick.cursor)["key"] == "job007x"  # ties on updated_at broken by the id's text
    written = sum(
        int(metadata(run_partition(config, "docs", k, instance), "written_table")["rows_written"]) for k in changed
    )
    assert written == 2
    [(stored,)] = query(db, "SELECT content_hash FROM docs WHERE id = 'job007x'")
    assert stored == __import__("hashlib").sha256(b"Vacature 7: senior data engineer").hexdigest()
    assert not sensor_tick(defs, "docs_new_rows_sensor", instance, tick.cursor).run_requests


def test_id_ranges_refuse_text_keys_in_one_line(tmp_path: Path) -> None:
    db = _text_keyed(tmp_path)
    path = write_config(tmp_path, {"datasets": {"docs": _dataset(db)}})
    env = subprocess_env(BACKFILL_CONFIG=str(path), DAGSTER_HOME=str(tmp_path))
    done = subprocess.run([CLI, "register"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: dataset 'docs': id column docs.id has type TEXT; partitions by id range need an INTEGER column; "
        "for other keys use partitioning: {kind: hash, buckets: 16}"
    ]


def test_time_partitions_use_dagster_windows_and_the_jobs_schedule(tmp_path: Path, instance) -> None:
    db = tmp_path / "docs.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT, created_at TEXT)")
    rows = [(1, "before the start", "2025-12-31T23:59:59+00:00"), (2, "first day", "2026-01-01 00:00:00")]
    rows += [(3, "first day, late (UTC)", "2026-01-01T23:30:00-00:00"), (4, "second day", "2026-01-02 08:00:00")]
    rows += [(5, "first day in Oslo, second in UTC", "2026-01-02T00:30:00+00:00")]
    conn.executemany("INSERT INTO docs VALUES (?, ?, ?)", rows)
    conn.commit()
    conn.close()
    partitioning = {"kind": "time", "column": "created_at", "granularity": "day", "start": "2026-01-01"}
    config = parse_config({"datasets": {"docs": _dataset(db, partitioning=partitioning)}})
    with open_store("docs", config.datasets["docs"]) as store:
        store.migrate()
        # (key, largest id); row 1 comes before the first partition
        assert partition_activity(store.rows, config.datasets["docs"]) == [("2026-01-01", 3), ("2026-01-02", 5)]
    defs = backfill_definitions(config)
    job = defs.resolve_job_def("docs_backfill_job")
    assert isinstance(job.partitions_def, dg.DailyPartitionsDefinition)
    schedule = defs.resolve_schedule_def("docs_refresh_schedule")
    assert schedule.cron_schedule == "0 0 * * *"  # built from the partitioned job
    result = run_partition(config, "docs", "2026-01-01", instance)
    assert metadata(result, "written_table")["rows_written"] == 2
    assert query(db, "SELECT id FROM docs WHERE embedding IS NOT NULL ORDER BY id") == [(2,), (3,)]
    tick = schedule.evaluate_tick(
        dg.build_schedule_context(instance=instance, scheduled_execution_time=datetime(2026, 1, 3, tzinfo=timezone.utc))
    )
    assert [r.partition_key for r in tick.run_requests] == ["2026-01-03"]  # end_offset 1: the current day


def test_time_partitioning_needs_its_column_and_start() -> None:
    with pytest.raises(ConfigError, match="kind 'time' needs 'column'"):
        parse_config({"datasets": {"docs": _dataset(Path("x.sqlite"), partitioning={"kind": "time"})}})


def _archives(tmp_path: Path) -> Path:
    db = tmp_path / "docs.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, archive TEXT, body TEXT)")
    names = ["gjeldende-lover.tar.bz2", "Forskrifter 2024 – Ærø.tar.bz2", None]
    conn.executemany("INSERT INTO docs VALUES (?, ?, ?)", [(i, names[i % 3], f"Lov nr {i}") for i in range(1, 31)])
    conn.commit()
    conn.close()
    return db


def test_null_archives_have_a_partition_and_are_embedded(tmp_path: Path, instance) -> None:
    db = _archives(tmp_path)
    dataset = _dataset(db, archive_column="archive", partitioning={"kind": "archive"})
    config = parse_config({"datasets": {"docs": dataset}})
    with open_store("docs", config.datasets["docs"]) as store:
        store.migrate()
    keys = register(config, "docs", instance)
    assert keys == ["forskrifter-2024-r-tar-bz2", NULL_ARCHIVE_KEY, "gjeldende-lover-tar-bz2"]  # by first id
    result = run_partition(config, "docs", NULL_ARCHIVE_KEY, instance)
    assert metadata(result, "written_table")["rows_written"] == 10
    assert query(db, "SELECT count(*) FROM docs WHERE archive IS NULL AND embedding IS NULL") == [(0,)]


def test_archive_names_as_written_on_the_command_line(tmp_path: Path) -> None:
    db = _archives(tmp_path)
    dataset = _dataset(db, archive_column="archive", partitioning={"kind": "archive"})
    path = write_config(tmp_path, {"datasets": {"docs": dataset}})
    (tmp_path / "home").mkdir()
    env = subprocess_env(BACKFILL_CONFIG=str(path), DAGSTER_HOME=str(tmp_path / "home"))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=300)

    assert cli("migrate").returncode == 0
    assert cli("register").returncode == 0
    done = cli("materialize", "--partition", "Forskrifter 2024 – Ærø.tar.bz2", "--partition-of", "3", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["partitions"] == {"ok": 2} and summary["rows_written"] == 20, summary
    assert query(db, "SELECT count(*) FROM docs WHERE embedding IS NULL AND archive IS NULL") == [(10,)]  # untouched
    wrong = cli("materialize", "--partition", "gjeldende-lover.tar")
    assert wrong.returncode == 2
    assert wrong.stderr.splitlines() == [
        "error: dataset 'docs': no partition 'gjeldende-lover.tar' among its 3 registered partitions; "
        "nearest: gjeldende-lover-tar-bz2"
    ]


def test_rows_gone_from_the_source_leave_a_separate_results_table(tmp_path: Path, instance) -> None:
    """Deleted rows, and rows the row filter now excludes (the clips seed's ``is_removed``), on SQLite."""
    db = _text_keyed(tmp_path)
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE docs ADD COLUMN is_removed INTEGER NOT NULL DEFAULT 0")
    conn.commit()
    conn.close()
    dataset = _dataset(
        db,
        row_filter="is_removed = 0",
        partitioning={"kind": "hash", "buckets": 2},
        target={"mode": "table", "table": "doc_vectors", "id_column": "doc_id"},
    )
    config = parse_config({"datasets": {"docs": dataset}})
    with open_store("docs", config.datasets["docs"]) as store:
        store.migrate()
    for key in ("h0", "h1"):
        run_partition(config, "docs", key, instance)
    assert query(db, "SELECT count(*) FROM doc_vectors") == [(40,)]
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM docs WHERE id IN ('job001x', 'job002x')")
    conn.execute("UPDATE docs SET is_removed = 1 WHERE id = 'job003x'")
    conn.commit()
    conn.close()
    gone = {"job001x", "job002x", "job003x"}
    deleted = {}
    for key in ("h0", "h1"):
        deleted[key] = metadata(run_partition(config, "docs", key, instance), "written_table")["rows_deleted"]
    assert deleted == {hash_key(b, 2): sum(hash_bucket(i, 2) == b for i in gone) for b in (0, 1)}
    assert query(db, "SELECT count(*) FROM doc_vectors") == [(37,)]
    assert not query(db, "SELECT doc_id FROM doc_vectors WHERE doc_id IN ('job001x', 'job002x', 'job003x')")
