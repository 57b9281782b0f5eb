"""One bad row never fails its partition: each ends in an outcome of its own, on SQLite and on Postgres."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest

from backfill_pipeline.config import parse_config
from backfill_pipeline.providers.base import Enrichment
from backfill_pipeline.stores import open_store

from .graph_helpers import metadata, register, run_partition

# stored embeddings that are no list of numbers, as found in real jsonb/text columns
UNREADABLE = ['"abc"', '{"a": 1}', "[[1, 2], [3, 4]]", "[1, null, 2]", '["NaN"]', '[1, "2"]']
DIM = 8


def _rows() -> list[tuple[int, str, str | None]]:
    rows: list[tuple[int, str, str | None]] = [
        (i + 1, f"document {i + 1} about pipelines", v) for i, v in enumerate(UNREADABLE)
    ]
    rows += [(i, f"document {i} about search", None) for i in range(len(UNREADABLE) + 1, 11)]
    return rows


def _config(url: str, **extra: object):
    dataset = {"database_url": url, "table": "docs", "text": {"columns": ["body"]}, "embedding": {"dimension": DIM}}
    return parse_config({"datasets": {"docs": {**dataset, **extra}}})


def _check(config, instance, read_back) -> None:
    with open_store("docs", config.datasets["docs"]) as store:
        store.migrate()
    key = register(config, "docs", instance)[0]
    result = run_partition(config, "docs", key, instance)
    detected = metadata(result, "detected_placeholders")
    assert detected["rows_unreadable_embedding"] == len(UNREADABLE)
    assert metadata(result, "written_table")["rows_written"] == 10
    stored = read_back()
    assert len(stored) == 10 and all(len(v) == DIM for v in stored)
    again = run_partition(config, "docs", key, instance)
    assert metadata(again, "written_table")["rows_written"] == 0  # all readable and current now


def test_unreadable_embeddings_in_sqlite_are_reembedded(tmp_path: Path, instance) -> None:
    db = tmp_path / "docs.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT, embedding TEXT)")
    conn.executemany("INSERT INTO docs VALUES (?, ?, ?)", _rows())
    conn.commit()
    conn.close()

    def read_back() -> list[list[float]]:
        import json

        return [json.loads(r[0]) for r in sqlite3.connect(db).execute("SELECT embedding FROM docs ORDER BY id")]

    _check(_config(f"sqlite:///{db}"), instance, read_back)


def test_unreadable_embeddings_in_postgres_jsonb_are_reembedded(pg_db, instance) -> None:
    url, schema = pg_db
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{schema}".docs (id bigint PRIMARY KEY, body text, embedding jsonb)')
        conn.cursor().executemany(f'INSERT INTO "{schema}".docs VALUES (%s, %s, %s::jsonb)', _rows())

    def read_back() -> list[list[float]]:
        with psycopg.connect(url) as conn:
            return [r[0] for r in conn.execute(f'SELECT embedding FROM "{schema}".docs ORDER BY id')]

    _check(_config(url, schema=schema), instance, read_back)


@pytest.mark.parametrize("field", ["summary", "skills", "seniority"])
def test_nul_characters_never_reach_the_cache_or_the_table(field: str) -> None:
    """Postgres rejects NUL in text: an answer carrying one would fail its whole write batch on every run."""
    answer = {"skills": ["Python", "SQL"], "seniority": "senior", "summary": "Builds pipelines."}
    answer[field] = ["Py\x00thon", "SQL"] if field == "skills" else ("sen\x00ior" if field == "seniority" else "A\x00B")
    cleaned = Enrichment.model_validate(answer)
    assert "\x00" not in cleaned.model_dump_json()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_row_the_database_refuses_is_recorded_and_the_rest_of_its_batch_written(
    backend: str, tmp_path: Path, instance, request
) -> None:
    """A constraint refuses one row's values: the batch is split until that row is found; it is recorded in
    the failures table with the database's words, and every other row of the batch is written."""
    check = "CHECK (embedding_model IS NULL OR id <> 7)"
    if backend == "sqlite":
        db = tmp_path / "docs.sqlite"
        conn = sqlite3.connect(db)
        conn.execute(
            "CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT, embedding TEXT, content_hash TEXT, "
            f"embedding_model TEXT, embedded_at TEXT, {check})"
        )
        conn.executemany("INSERT INTO docs (id, body) VALUES (?, ?)", [(i, f"text {i}") for i, *_ in _rows()])
        conn.commit()
        conn.close()
        config = _config(f"sqlite:///{db}", write_batch_size=5)

        def count(sql: str) -> int:
            return sqlite3.connect(db).execute(sql).fetchone()[0]
    else:
        url, schema = request.getfixturevalue("pg_db")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                f'CREATE TABLE "{schema}".docs (id bigint PRIMARY KEY, body text, embedding real[], content_hash text, '
                f"embedding_model text, embedded_at timestamptz, {check})"
            )
            conn.cursor().executemany(
                f'INSERT INTO "{schema}".docs (id, body) VALUES (%s, %s)', [(i, f"text {i}") for i, *_ in _rows()]
            )
        config = _config(url, schema=schema, write_batch_size=5)

        def count(sql: str) -> int:
            with psycopg.connect(url) as conn:
                conn.execute(f'SET search_path TO "{schema}"')
                return conn.execute(sql).fetchone()[0]

    with open_store("docs", config.datasets["docs"]) as store:
        store.migrate()
        key = register(config, "docs", instance)[0]
        result = run_partition(config, "docs", key, instance)
        written = metadata(result, "written_table")
        assert (written["rows_written"], written["rows_write_rejected"]) == (9, 1)
        assert count("SELECT count(*) FROM docs WHERE embedding IS NOT NULL") == 9
        assert count("SELECT count(*) FROM docs WHERE id = 7 AND embedding IS NULL") == 1
        failures = store.ledger.failures()
        assert [(f["row_id"], f["stage"], f["error_class"]) for f in failures] == [
            ("7", "write", "rejected_by_database")
        ]
        assert "check" in failures[0]["message"].lower()


def test_text_that_is_not_utf8_is_a_recorded_row_failure_not_a_failed_partition(tmp_path: Path, instance) -> None:
    db = tmp_path / "docs.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT)")
    conn.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"text {i}") for i in range(1, 11) if i != 4])
    conn.execute("INSERT INTO docs VALUES (4, CAST(x'ff66e96c6c6f' AS TEXT))")  # Latin-1 bytes in a TEXT column
    conn.commit()
    conn.close()
    config = _config(f"sqlite:///{db}")
    with open_store("docs", config.datasets["docs"]) as store:
        store.migrate()
        key = register(config, "docs", instance)[0]
        result = run_partition(config, "docs", key, instance)
        assert metadata(result, "detected_placeholders")["rows_undecodable_text"] == 1
        assert metadata(result, "written_table")["rows_written"] == 9
        failures = store.ledger.failures()
        assert [(f["row_id"], f["stage"], f["error_class"]) for f in failures] == [("4", "read", "undecodable_text")]
        assert "column body holds bytes that are not UTF-8" in failures[0]["message"]
    unwritten = sqlite3.connect(db).execute("SELECT id FROM docs WHERE embedding IS NULL").fetchall()
    assert unwritten == [(4,)]
