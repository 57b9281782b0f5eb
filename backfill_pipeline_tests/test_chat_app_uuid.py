"""The chat-app seed as it really is: Supabase tables keyed by UUID (``sessions.title`` and
``summaries.content``, 1536 dimensions) on Postgres with pgvector, two datasets, hash partitions and
trigger change capture. New, edited and deleted rows reach the table after one sensor tick and one run."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from backfill_pipeline.config import parse_config
from backfill_pipeline.lib import backfill_definitions
from backfill_pipeline.partitions import hash_key, key_of_id, partition_spec
from backfill_pipeline.stores import open_store
from backfill_pipeline.stores.groups import hash_bucket

from .conftest import subprocess_env, write_config
from .graph_helpers import metadata, run_partition, sensor_tick

BUCKETS = 4


def _config(schema_free_url_env: str = "CHAT_DATABASE_URL") -> dict:
    common = {
        "database_url": {"env": schema_free_url_env},
        "partitioning": {"kind": "hash", "buckets": BUCKETS},
        "change_tracking": {"trigger": True},
        "read_batch_size": 16,
    }
    return {
        "datasets": {
            "sessions": {
                **common,
                "table": "sessions",
                "text": {"columns": ["title"]},
                "embedding": {"dimension": 1536, "column": "title_embedding"},
            },
            "summaries": {
                **common,
                "table": "summaries",
                "text": {"columns": ["content"]},
                "embedding": {"dimension": 1536, "column": "content_embedding"},
                "target": {"mode": "table", "table": "summary_vectors", "id_column": "summary_id"},
            },
        }
    }


@pytest.fixture
def chat_db(pgvector_db: str, monkeypatch: pytest.MonkeyPatch) -> str:
    with psycopg.connect(pgvector_db, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE sessions (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL, "
            "title text, title_embedding vector(1536), created_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            "CREATE TABLE summaries (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), session_id uuid "
            "REFERENCES sessions(id) ON DELETE CASCADE, content text)"
        )
        conn.execute(
            # keys fixed by their number (md5 as a UUID), so every hash bucket of both tables has rows: random
            # ones left a bucket of the 22 summaries empty about one run in 150, and a partition less to run
            "INSERT INTO sessions (id, user_id, title) SELECT md5('session ' || g)::uuid, gen_random_uuid(), "
            "'Session about ' || "
            "(ARRAY['pgvector','Dagster','rate limits','Supabase auth','UUID keys'])[1 + g % 5] || ' #' || g "
            "FROM generate_series(1, 33) g"
        )
        conn.execute(
            "INSERT INTO summaries (id, session_id, content) SELECT md5('summary ' || id)::uuid, id, "
            "'The user asked about ' || title "
            "FROM sessions ORDER BY id LIMIT 22"
        )
    monkeypatch.setenv("CHAT_DATABASE_URL", pgvector_db)
    return pgvector_db


def _run_requested(config, name: str, instance, cursor: str | None):
    defs = backfill_definitions(config)
    tick = sensor_tick(defs, f"{name}_new_rows_sensor", instance, cursor)
    results = {r.partition_key: run_partition(config, name, r.partition_key, instance) for r in tick.run_requests}
    return tick, results


def _count(url: str, query: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchone()[0]


def test_uuid_tables_backfill_and_follow_inserts_edits_and_deletes(chat_db: str, instance, tmp_path: Path) -> None:
    config = parse_config(_config())
    for name in config.datasets:
        with open_store(name, config.datasets[name]) as store:
            added = store.migrate()
            assert any("trigger backfill_queue_" in a for a in added), added

    # the hash of a key's text is the same in Postgres and in Python: each row is read by the partition
    # Python computes for it
    with open_store("sessions", config.datasets["sessions"]) as store:
        for b in range(BUCKETS):
            key = hash_key(b, BUCKETS)
            ids = store.rows.read_partition(partition_spec(key, config.datasets["sessions"])).column("id").to_pylist()
            assert ids and all(hash_bucket(i, BUCKETS) == b for i in ids), key
            assert all(key_of_id(i, config.datasets["sessions"], store.rows) == key for i in ids)

    # first ticks: every partition holding rows needing work runs; everything is covered after
    cursors = {}
    for name in config.datasets:
        tick, results = _run_requested(config, name, instance, None)
        assert sorted(r.partition_key for r in tick.run_requests) == [hash_key(b, BUCKETS) for b in range(BUCKETS)]
        assert all(r.success for r in results.values())
        cursors[name] = tick.cursor
    assert _count(chat_db, "SELECT count(*) FROM sessions WHERE title_embedding IS NULL") == 0
    assert _count(chat_db, "SELECT count(*) FROM summary_vectors WHERE content_embedding IS NOT NULL") == 22
    assert _count(chat_db, "SELECT vector_dims(title_embedding) FROM sessions LIMIT 1") == 1536

    # nothing changed: the queue is empty, the next tick asks for nothing
    for name in config.datasets:
        tick, _ = _run_requested(config, name, instance, cursors[name])
        assert not tick.run_requests
        cursors[name] = tick.cursor or cursors[name]

    with psycopg.connect(chat_db, autocommit=True) as conn:
        new_id = conn.execute(
            "INSERT INTO sessions (user_id, title) VALUES (gen_random_uuid(), 'A brand new session') RETURNING id"
        ).fetchone()[0]
        edited_id, old_vector = conn.execute(
            "SELECT id, title_embedding::text FROM sessions WHERE id <> %s ORDER BY id LIMIT 1", [new_id]
        ).fetchone()
        conn.execute("UPDATE sessions SET title = 'Renamed: hash partitions' WHERE id = %s", [edited_id])
        gone_id, kept_id = [r[0] for r in conn.execute("SELECT id FROM summaries ORDER BY id LIMIT 2")]
        conn.execute("DELETE FROM summaries WHERE id = %s", [gone_id])
        conn.execute("UPDATE summaries SET content = 'Edited summary text' WHERE id = %s", [kept_id])

    tick, results = _run_requested(config, "sessions", instance, cursors["sessions"])
    expected = sorted({hash_key(hash_bucket(str(i), BUCKETS), BUCKETS) for i in (new_id, edited_id)})
    assert sorted(r.partition_key for r in tick.run_requests) == expected  # only the partitions that changed
    with psycopg.connect(chat_db) as conn:
        row = conn.execute("SELECT title_embedding IS NOT NULL FROM sessions WHERE id = %s", [new_id]).fetchone()
        assert row == (True,)
        vector, stored_hash = conn.execute(
            "SELECT title_embedding::text, content_hash FROM sessions WHERE id = %s", [edited_id]
        ).fetchone()
    assert vector != old_vector
    assert stored_hash == hashlib.sha256(b"Renamed: hash partitions").hexdigest()

    tick, results = _run_requested(config, "summaries", instance, cursors["summaries"])
    expected = sorted({hash_key(hash_bucket(str(i), BUCKETS), BUCKETS) for i in (gone_id, kept_id)})
    assert sorted(r.partition_key for r in tick.run_requests) == expected
    deleted = sum(int(metadata(r, "written_table")["rows_deleted"]) for r in results.values())
    assert deleted == 1
    assert _count(chat_db, f"SELECT count(*) FROM summary_vectors WHERE summary_id = '{gone_id}'") == 0
    assert (
        _count(
            chat_db,
            f"SELECT count(*) FROM summary_vectors WHERE summary_id = '{kept_id}' AND content_hash = "
            f"'{hashlib.sha256(b'Edited summary text').hexdigest()}'",
        )
        == 1
    )

    # the next tick forgets what the last one handed out (Dagster stored its cursor by then)
    queued = "SELECT count(*) FROM backfill_queue"
    assert _count(chat_db, queued) > 0
    for name in config.datasets:
        after, _ = _run_requested(config, name, instance, tick.cursor if name == "summaries" else None)
        if name == "summaries":
            assert not after.run_requests
    assert _count(chat_db, "SELECT count(*) FROM backfill_queue WHERE dataset = 'summaries'") == 0

    # the commands work on UUID keys too: coverage is 100% of both tables
    path = write_config(tmp_path, _config())
    (tmp_path / "home").mkdir()
    env = subprocess_env(BACKFILL_CONFIG=str(path), DAGSTER_HOME=str(tmp_path / "home"), CHAT_DATABASE_URL=chat_db)
    cli = str(Path(sys.executable).parent / "backfill-pipeline")
    done = subprocess.run([cli, "coverage", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    totals = [r for r in json.loads(done.stdout) if r["partition"] == "(all)"]
    assert sorted((r["dataset"], r["coverage_percent"], r["rows"]) for r in totals) == [
        ("sessions", 100.0, 34),
        ("summaries", 100.0, 21),
    ]


def test_uuid_tables_backfill_through_the_cli(chat_db: str, tmp_path: Path) -> None:
    path = write_config(tmp_path, _config())
    (tmp_path / "home").mkdir()
    env = subprocess_env(BACKFILL_CONFIG=str(path), DAGSTER_HOME=str(tmp_path / "home"), CHAT_DATABASE_URL=chat_db)
    cli = str(Path(sys.executable).parent / "backfill-pipeline")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([cli, *args], env=env, capture_output=True, text=True, timeout=300)

    assert run("migrate").returncode == 0
    planned = run("plan", "--json")
    assert planned.returncode == 0, planned.stderr
    assert [(p["dataset"], p["reasons"]) for p in json.loads(planned.stdout)] == [
        ("sessions", {"null_embedding": 33}),
        ("summaries", {"null_embedding": 22}),
    ]
    done = run("materialize", "--parallel", "2", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["partitions"] == {"ok": 2 * BUCKETS} and summary["rows_written"] == 55, summary
    status = json.loads(run("status").stdout)
    assert [(s["dataset"], s["coverage_percent"]) for s in status] == [("sessions", 100.0), ("summaries", 100.0)]
