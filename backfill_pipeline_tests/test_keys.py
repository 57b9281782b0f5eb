"""Keys are checked before anything is paid for: a clear error naming the column and an example id."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import psycopg
import pytest

from backfill_pipeline.config import parse_config
from backfill_pipeline.lib import backfill_definitions, job_name
from backfill_pipeline.stores import SchemaError, open_store

from .graph_helpers import register


def _config(url: str, **extra: object):
    dataset = {"database_url": url, "table": "docs", "text": {"columns": ["body"]}, "embedding": {"dimension": 8}}
    return parse_config({"datasets": {"docs": {**dataset, **extra}}})


def _sqlite(tmp_path: Path, create: str, rows: list[tuple]) -> str:
    conn = sqlite3.connect(tmp_path / "docs.sqlite")
    conn.execute(create)
    conn.executemany("INSERT INTO docs (id, body) VALUES (?, ?)", rows)
    conn.commit()
    conn.close()
    return f"sqlite:///{tmp_path / 'docs.sqlite'}"


def test_a_repeated_id_fails_the_partition_before_any_provider_call(tmp_path: Path, instance) -> None:
    url = _sqlite(tmp_path, "CREATE TABLE docs (id INTEGER, body TEXT)", [(1, "a"), (2, "b"), (2, "c"), (3, "d")])
    config = _config(url)
    with open_store("docs", config.datasets["docs"]) as store:
        store.migrate()
    key = register(config, "docs", instance)[0]
    job = backfill_definitions(config).resolve_job_def(job_name("docs"))
    result = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "docs__raw_rows"  # nothing after the read ran: nothing paid, nothing written
    message = failure.event_specific_data.error.message
    assert "id column id is not unique: id 2 appears 2 times" in message, message
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]  # retrying cannot help
    conn = sqlite3.connect(tmp_path / "docs.sqlite")
    assert conn.execute("SELECT count(*) FROM docs WHERE embedding IS NOT NULL").fetchone()[0] == 0


def test_a_text_id_in_sqlite_is_named(tmp_path: Path) -> None:
    url = _sqlite(tmp_path, "CREATE TABLE docs (id TEXT PRIMARY KEY, body TEXT)", [("abc123", "a")])
    config = _config(url)
    with (
        open_store("docs", config.datasets["docs"]) as store,
        pytest.raises(SchemaError, match=r"id column docs.id has type TEXT; partitions by id range need an INTEGER"),
    ):
        store.migrate()  # refused before the table is altered
    assert [r[1] for r in sqlite3.connect(tmp_path / "docs.sqlite").execute("PRAGMA table_info(docs)")] == [
        "id",
        "body",
    ]


def test_a_separate_target_without_a_unique_id_is_refused_on_sqlite(tmp_path: Path) -> None:
    url = _sqlite(tmp_path, "CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT)", [(1, "a")])
    conn = sqlite3.connect(tmp_path / "docs.sqlite")
    conn.execute(
        "CREATE TABLE doc_vectors (doc_id INTEGER, embedding TEXT, content_hash TEXT, embedding_model TEXT, "
        "embedded_at TEXT)"
    )
    conn.commit()
    conn.close()
    config = _config(url, target={"mode": "table", "table": "doc_vectors", "id_column": "doc_id"})
    with open_store("docs", config.datasets["docs"]) as store:
        store.migrate()
        with pytest.raises(SchemaError, match="doc_vectors.doc_id has no primary key or unique index"):
            store.check_schema()


@pytest.mark.parametrize("case", ["numeric_id", "target_without_key"])
def test_postgres_keys_are_checked_with_the_schema(pg_db, case: str) -> None:
    url, schema = pg_db
    id_type = "numeric(12, 2)" if case == "numeric_id" else "bigint"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{schema}".docs (id {id_type} PRIMARY KEY, body text)')
        ids = (1.5, 1.25) if case == "numeric_id" else (1, 2)
        conn.execute(f'INSERT INTO "{schema}".docs VALUES (%s, %s), (%s, %s)', [ids[0], "a", ids[1], "b"])
        conn.execute(
            f'CREATE TABLE "{schema}".doc_vectors (doc_id bigint, embedding real[], content_hash text, '
            "embedding_model text, embedded_at timestamptz)"
        )
    extra: dict = {"schema": schema}
    if case == "target_without_key":
        extra["target"] = {"mode": "table", "table": "doc_vectors", "schema": schema, "id_column": "doc_id"}
    config = _config(url, **extra)
    with open_store("docs", config.datasets["docs"]) as store:
        if case != "numeric_id":  # migrate refuses a key the partitioning cannot use
            store.migrate()
        expected = (
            r"id column .*docs.id has type numeric\(12,2\); partitions by id range need an integer column"
            if case == "numeric_id"
            else "doc_vectors.doc_id has no primary key or unique index"
        )
        with pytest.raises(SchemaError, match=expected):
            store.check_schema()


def test_a_uuid_key_is_one_line_from_register_not_a_cast_traceback(pg_db, tmp_path: Path) -> None:
    """The chat-app seed's Supabase tables are keyed by UUID: the commands that read partitions say what
    is wrong, naming the column and its type, before any statement casts the id."""
    import subprocess
    import sys

    from .conftest import subprocess_env, write_config

    url, schema = pg_db
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{schema}".docs (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), body text)')
        conn.execute(f'INSERT INTO "{schema}".docs (body) VALUES (%s), (%s)', ["a", "b"])
    dataset = {"database_url": {"env": "DOCS_DATABASE_URL"}, "schema": schema, "table": "docs"}
    dataset |= {"text": {"columns": ["body"]}, "embedding": {"dimension": 8}}
    path = write_config(tmp_path, {"datasets": {"docs": dataset}})
    (tmp_path / "home").mkdir()
    env = subprocess_env(BACKFILL_CONFIG=str(path), DAGSTER_HOME=str(tmp_path / "home"), DOCS_DATABASE_URL=url)
    cli = str(Path(sys.executable).parent / "backfill-pipeline")
    done = subprocess.run([cli, "register"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: dataset 'docs': id column {schema}.docs.id has type uuid; partitions by id range need an integer "
        "column (smallint, integer or bigint); for other keys use partitioning: {kind: hash, buckets: 16}"
    ]


def test_one_datasets_uuid_key_leaves_the_other_dataset_working(pg_db, tmp_path: Path) -> None:
    """``migrate`` refuses before altering the table, and ``coverage`` still reports the good dataset."""
    import subprocess
    import sys

    from .conftest import subprocess_env, write_config

    url, schema = pg_db
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{schema}".sessions (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), body text)')
        conn.execute(f'CREATE TABLE "{schema}".docs (id bigint PRIMARY KEY, body text)')
        conn.execute(f'INSERT INTO "{schema}".sessions (body) VALUES (%s)', ["a"])
        conn.execute(f'INSERT INTO "{schema}".docs VALUES (1, %s), (2, %s)', ["a", "b"])
    common = {"database_url": {"env": "DOCS_DATABASE_URL"}, "schema": schema, "text": {"columns": ["body"]}}
    common |= {"embedding": {"dimension": 8}}
    data = {"datasets": {"sessions": {**common, "table": "sessions"}, "docs": {**common, "table": "docs"}}}
    env = subprocess_env(
        BACKFILL_CONFIG=str(write_config(tmp_path, data)), DAGSTER_HOME=str(tmp_path), DOCS_DATABASE_URL=url
    )
    cli = str(Path(sys.executable).parent / "backfill-pipeline")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([cli, *args], env=env, capture_output=True, text=True, timeout=120)

    migrated = run("migrate")
    assert migrated.returncode == 2
    with psycopg.connect(url) as conn:
        columns = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = 'sessions'",
            [schema],
        ).fetchall()
    assert sorted(c for (c,) in columns) == ["body", "id"]  # not altered
    covered = run("coverage", "--json")
    assert covered.returncode == 2
    assert covered.stderr.splitlines() == [
        f"error: dataset 'sessions': id column {schema}.sessions.id has type uuid; partitions by id range need an "
        "integer column (smallint, integer or bigint); for other keys use partitioning: {kind: hash, buckets: 16}"
    ]
    assert [(r["dataset"], r["rows"]) for r in json.loads(covered.stdout) if r["partition"] == "(all)"] == [("docs", 2)]
