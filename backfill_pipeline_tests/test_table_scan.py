"""Table-wide readings counted by the database agree with reading every row: per partition, by reason, on
SQLite (the demo's states) and on Postgres for each vector column type; and the plan made from them is the
plan made by reading everything."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psycopg
import pytest

from backfill_pipeline.config import TextSpec, load_config, parse_config
from backfill_pipeline.coverage import partition_coverage
from backfill_pipeline.partitions import partition_activity, partition_spec
from backfill_pipeline.plan import plan_dataset
from backfill_pipeline.stores import Failure, open_store
from backfill_pipeline.table_scan import read_pending
from backfill_pipeline.text import content_hash, render_text

from .conftest import query

DIM = 8
TEXT = {"columns": ["title", "body"], "separator": " | "}


def _assert_same_as_reading_everything(name: str, dataset) -> None:
    with open_store(name, dataset) as store:
        keys = [k for k, _ in partition_activity(store.rows, dataset)]
        reading = read_pending(store, dataset, keys)
        assert reading is not None
        for key in keys:
            part = partition_spec(key, dataset, store.rows)
            exact = partition_coverage(store, dataset, part, exact=True)
            counted = reading.coverage(key)
            assert (counted.rows, dict(counted.reasons)) == (exact.rows, dict(+exact.reasons)), key
            checked = partition_coverage(store, dataset, part)  # what the checks read: this partition only
            assert (checked.rows, dict(checked.reasons)) == (exact.rows, dict(+exact.reasons)), key


def test_sqlite_demo_states_agree(demo_db: Path, demo_config_path: Path) -> None:
    dataset = load_config(demo_config_path).datasets["jobs"]
    [(failed,)] = query(demo_db, "SELECT min(id) FROM job_postings WHERE embedding IS NULL AND description <> ''")
    with open_store("jobs", dataset) as store:
        store.ledger.record_failures([Failure(failed, "embedding", "server_error", "500")])
    _assert_same_as_reading_everything("jobs", dataset)
    counted, exact = plan_dataset("jobs", dataset), plan_dataset("jobs", dataset, exact=True)
    assert counted.reasons == exact.reasons and vars(counted.embedding) == vars(exact.embedding)
    assert vars(counted.enrichment) == vars(exact.enrichment) and counted.work_by_partition == exact.work_by_partition
    limited = plan_dataset("jobs", dataset, limit=50), plan_dataset("jobs", dataset, limit=50, exact=True)
    assert limited[0].reasons == limited[1].reasons and vars(limited[0].embedding) == vars(limited[1].embedding)


def _rows() -> list[tuple]:
    """(id, title, body, vector, hash, model) in every state detection knows that a database can hold."""
    spec = TextSpec.model_validate(TEXT)
    rng = np.random.default_rng(3)
    rows = []
    for i in range(1, 41):
        title, body = f"  Posting {i} ", f"Body of posting {i}\n"
        state = i % 8
        if state == 7:
            title, body = "   ", ""  # whitespace only: no text
        text = render_text(spec, {"title": title, "body": body})
        vector = rng.normal(size=DIM).round(5).tolist()
        digest, model = content_hash(text), "offline-hash-v1"
        if state == 0:
            vector, digest, model = None, None, None  # never embedded
        elif state == 1:
            vector = vector[:4]  # wrong dimension
        elif state == 2:
            vector = [0.0] * DIM  # zero placeholder
        elif state == 3:
            digest = content_hash("the text before an edit")  # stale
        elif state == 4:
            model = "legacy-embedder-v0"
        elif state == 5:
            digest = None  # embedded before this tool: trusted
        rows.append((i, title, body, vector, digest, model))
    return rows


@pytest.mark.parametrize("kind", ["vector", "jsonb", "real[]"])
def test_postgres_vector_columns_agree(pgvector_db: str, kind: str) -> None:
    column = {"vector": "vector", "jsonb": "jsonb", "real[]": "real[]"}[kind]  # no typmod: any length fits
    with psycopg.connect(pgvector_db, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE docs (id bigint PRIMARY KEY, title text, body text, embedding {column}, "
            "content_hash text, embedding_model text, embedded_at timestamptz)"
        )
        for i, title, body, vector, digest, model in _rows():
            value = None if vector is None else (json.dumps(vector) if kind != "real[]" else vector)
            conn.execute(
                "INSERT INTO docs VALUES (%s, %s, %s, %s, %s, %s, now())", [i, title, body, value, digest, model]
            )
    data = {"database_url": pgvector_db, "table": "docs", "text": TEXT, "embedding": {"dimension": DIM}}
    dataset = parse_config({"datasets": {"docs": {**data, "partitioning": {"width": 10}}}}).datasets["docs"]
    with open_store("docs", dataset) as store:
        store.migrate()
        store.ledger.record_failures([Failure(8, "embedding", "server_error", "500")])  # id 8: never embedded
    _assert_same_as_reading_everything("docs", dataset)
