"""A whole partition through the graph on the embedded store, checked in the database."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from backfill_pipeline.config import load_config, parse_config
from backfill_pipeline.demo_data import render
from backfill_pipeline.detection import classify_vectors
from backfill_pipeline.lib import backfill_definitions
from backfill_pipeline.rows import vector_array
from backfill_pipeline.stores import StoreError, open_store
from backfill_pipeline.text import content_hash

from .conftest import query, write_config
from .graph_helpers import materialized_assets, metadata, register, run_partition

USER_COLUMNS = "id, title, company, location, description, posted_at"


def snapshot(db: Path, columns: str = "*") -> list[tuple]:
    return query(db, f"SELECT {columns} FROM job_postings ORDER BY id")


def test_partition_through_graph(demo_db: Path, demo_config_path: Path, instance: dg.DagsterInstance) -> None:
    config = load_config(demo_config_path)
    keys = register(config, "jobs", instance)
    assert keys == ["0000000000-0000000099", "0000000100-0000000199", "0000000200-0000000299", "0000000300-0000000399"]
    before_user, before_all = snapshot(demo_db, USER_COLUMNS), snapshot(demo_db)

    result = run_partition(config, "jobs", keys[1], instance)
    assert result.success

    rows = query(
        demo_db,
        "SELECT id, title, company, description, embedding, content_hash, embedding_model, skills, seniority, summary "
        "FROM job_postings WHERE id BETWEEN 100 AND 199 ORDER BY id",
    )
    vectors = [None if r[4] is None else np.array(json.loads(r[4]), dtype=np.float32) for r in rows]
    reasons = classify_vectors(vector_array(vectors), 768)
    for row, reason in zip(rows, reasons, strict=True):
        if not row[3]:  # no description: skipped, untouched
            continue
        assert reason == "ok", row[0]
        text = render({"title": row[1], "company": row[2], "description": row[3]})
        assert row[5] == content_hash(text) and row[6] == "offline-hash-v1"
        assert json.loads(row[7]) is not None and row[8] in {"intern", "junior", "mid", "senior", "lead", "executive"}
        assert row[9]
    # user columns untouched everywhere; rows outside the partition untouched entirely
    assert snapshot(demo_db, USER_COLUMNS) == before_user
    after_all = snapshot(demo_db)
    assert [r for r in after_all if not 100 <= r[0] <= 199] == [r for r in before_all if not 100 <= r[0] <= 199]

    written = metadata(result, "written_table")
    detected = metadata(result, "detected_placeholders")
    changed = sum(1 for a, b in zip(before_all, after_all, strict=True) if a != b)
    assert written["rows_written"] == changed > 0
    assert detected["rows_in"] == 100 == written["rows_in"]
    assert detected["rows_null_embedding"] + detected["rows_placeholder_sequential"] > 0
    checks = result.get_asset_check_evaluations()
    names = ("embedding_coverage", "vectors_valid", "no_placeholders", "failure_rate")
    assert {c.check_name: c.passed for c in checks} == dict.fromkeys(names, True)


def test_second_run_calls_no_provider_and_writes_nothing(
    demo_db: Path, demo_config_path: Path, instance: dg.DagsterInstance
) -> None:
    config = load_config(demo_config_path)
    key = register(config, "jobs", instance)[0]
    first = run_partition(config, "jobs", key, instance)
    assert metadata(first, "embeddings")["provider_requests"] > 0
    assert metadata(first, "llm_enrichment")["provider_requests"] > 0
    state = snapshot(demo_db)

    second = run_partition(config, "jobs", key, instance)
    assert metadata(second, "embeddings")["provider_requests"] == 0
    assert metadata(second, "llm_enrichment")["provider_requests"] == 0
    assert metadata(second, "written_table")["rows_written"] == 0
    assert snapshot(demo_db) == state  # not even a timestamp moved


def test_force_redoes_every_row_with_text(demo_db: Path, demo_config_path: Path, instance: dg.DagsterInstance) -> None:
    config = load_config(demo_config_path)
    key = register(config, "jobs", instance)[0]
    run_partition(config, "jobs", key, instance)
    with_text = query(demo_db, "SELECT COUNT(*) FROM job_postings WHERE id < 100 AND description != ''")[0][0]
    forced = run_partition(config, "jobs", key, instance, force=True)
    assert metadata(forced, "detected_placeholders")["rows_forced"] == with_text
    assert metadata(forced, "embeddings")["provider_inputs"] == with_text
    assert metadata(forced, "written_table")["rows_written"] == with_text


def test_limit_processes_part_of_a_partition(demo_db: Path, demo_config_path: Path, instance) -> None:
    config = load_config(demo_config_path)
    key = register(config, "jobs", instance)[0]
    limited = run_partition(config, "jobs", key, instance, limit=10)
    assert metadata(limited, "written_table")["rows_written"] == 10
    assert metadata(limited, "written_table")["rows_deferred"] > 0


def test_retried_downstream_step_reuses_persisted_upstream(
    demo_db: Path, demo_config_path: Path, instance: dg.DagsterInstance
) -> None:
    config = load_config(demo_config_path)
    key = register(config, "jobs", instance)[0]
    defs = backfill_definitions(config)
    upstream = [
        defs.resolve_assets_def(dg.AssetKey(["jobs", a]))
        for a in ("raw_rows", "detected_placeholders", "llm_enrichment", "embeddings")
    ]
    written = defs.resolve_assets_def(dg.AssetKey(["jobs", "written_table"]))
    first = dg.materialize(upstream, partition_key=key, instance=instance)  # resources come bound
    assert first.success
    nulls = query(demo_db, "SELECT COUNT(*) FROM job_postings WHERE id < 100 AND embedding IS NULL")[0][0]
    assert nulls > 0

    # only the last step runs; its inputs come from the Parquet files, not from recomputation
    second = dg.materialize([*upstream, written], partition_key=key, instance=instance, selection=[written.key])
    assert materialized_assets(second) == {"written_table"}
    assert (
        query(demo_db, "SELECT COUNT(*) FROM job_postings WHERE id < 100 AND embedding IS NULL AND description != ''")[
            0
        ][0]
        == 0
    )
    folder = Path(instance.storage_directory()) / "backfill_parquet" / "jobs" / "embeddings" / key
    assert [p.name for p in folder.iterdir()] == [f"{first.run_id}.parquet"]  # read from the run that made it


def test_missing_result_columns_is_a_clear_error_until_migrated(tmp_path: Path, instance) -> None:
    db = tmp_path / "bare.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT)")
    conn.executemany("INSERT INTO docs VALUES (?, ?)", [(i, f"document number {i}") for i in range(1, 21)])
    conn.commit()
    conn.close()
    config = parse_config(
        {
            "datasets": {
                "docs": {
                    "database_url": f"sqlite:///{db}",
                    "table": "docs",
                    "text": {"columns": ["body"]},
                    "embedding": {"dimension": 32},
                    "partitioning": {"width": 1000},
                }
            }
        }
    )
    with open_store("docs", config.datasets["docs"]) as store, pytest.raises(StoreError) as info:
        store.check_schema()
    assert "docs.embedding" in str(info.value) and "backfill-pipeline migrate --dataset docs" in str(info.value)
    key = register(config, "docs", instance)[0]
    failed = (
        backfill_definitions(config)
        .resolve_job_def("docs_backfill_job")
        .execute_in_process(partition_key=key, instance=instance, raise_on_error=False)
    )
    assert not failed.success
    assert query(db, "PRAGMA table_info(docs)")[-1][1] == "body"  # nothing added behind the user's back

    job = backfill_definitions(config).resolve_job_def("docs_backfill_job")
    ok = job.execute_in_process(
        partition_key=key, instance=instance, run_config={"ops": {"docs__raw_rows": {"config": {"migrate": True}}}}
    )
    assert metadata(ok, "written_table")["rows_written"] == 20
    assert query(db, "SELECT COUNT(*) FROM docs WHERE embedding IS NOT NULL")[0][0] == 20


def _chat_db(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE sessions (id INTEGER PRIMARY KEY, user_id TEXT, title TEXT, "
        "title_embedding TEXT, content_hash TEXT, embedding_model TEXT, embedded_at TEXT)"
    )
    conn.execute(
        "CREATE TABLE summaries (id INTEGER PRIMARY KEY, session_id INTEGER, content TEXT, "
        "content_embedding TEXT, content_hash TEXT, embedding_model TEXT, embedded_at TEXT)"
    )
    conn.executemany(
        "INSERT INTO sessions (id, user_id, title) VALUES (?, ?, ?)",
        [(i, f"u{i % 3}", f"Planning session {i} about hiring") for i in range(1, 34)],
    )
    conn.executemany(
        "INSERT INTO summaries (id, session_id, content) VALUES (?, ?, ?)",
        [(i, i, f"Summary {i}: we agreed on the interview plan.") for i in range(1, 23)],
    )
    conn.commit()
    conn.close()
    return path


def _chat_config(db: Path, target: dict | None = None) -> dict:
    common = {"database_url": f"sqlite:///{db}", "partitioning": {"width": 1000}}
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
                **(target or {}),
            },
        }
    }


def test_two_datasets_in_one_config(tmp_path: Path, instance, monkeypatch) -> None:
    db = _chat_db(tmp_path / "chat.sqlite")
    path = write_config(tmp_path, _chat_config(db))
    monkeypatch.setenv("BACKFILL_CONFIG", str(path))
    config = load_config(path)
    for name in config.datasets:
        with open_store(name, config.datasets[name]) as store:
            store.migrate()
    defs = backfill_definitions(config)
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert {"sessions/raw_rows", "summaries/written_table", "summaries/backfill_summary"} <= keys and len(keys) == 12
    for name, expected in (("sessions", 33), ("summaries", 22)):
        key = register(config, name, instance)[0]
        assert metadata(run_partition(config, name, key, instance), "written_table")["rows_written"] == expected
    lengths = query(db, "SELECT COUNT(*), MIN(json_array_length(title_embedding)) FROM sessions")[0]
    assert lengths == (33, 1536)
    assert query(db, "SELECT COUNT(*) FROM summaries WHERE json_array_length(content_embedding) = 1536")[0][0] == 22
    assert instance.get_dynamic_partitions("sessions_partitions") == ["0000000000-0000000999"]
    assert instance.get_dynamic_partitions("summaries_partitions") == ["0000000000-0000000999"]


def test_separate_target_table(tmp_path: Path, instance) -> None:
    db = _chat_db(tmp_path / "chat.sqlite")
    target = {"target": {"mode": "table", "table": "summary_embeddings", "id_column": "summary_id"}}
    config = parse_config(_chat_config(db, target))
    before = query(db, "SELECT * FROM summaries ORDER BY id")
    with open_store("summaries", config.datasets["summaries"]) as store:
        assert "summary_embeddings (table)" in store.migrate()
    key = register(config, "summaries", instance)[0]
    assert metadata(run_partition(config, "summaries", key, instance), "written_table")["rows_written"] == 22
    assert query(db, "SELECT * FROM summaries ORDER BY id") == before  # the source is never written
    rows = query(db, "SELECT summary_id, json_array_length(content_embedding), embedding_model FROM summary_embeddings")
    assert sorted(r[0] for r in rows) == list(range(1, 23)) and {r[1:] for r in rows} == {(1536, "offline-hash-v1")}
    again = run_partition(config, "summaries", key, instance)
    assert metadata(again, "written_table")["rows_written"] == 0
