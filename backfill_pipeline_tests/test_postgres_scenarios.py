"""Scenarios modelled on the seeds, each through the graph on a real Postgres, checked in SQL."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import psycopg
import pytest

from backfill_pipeline.config import parse_config
from backfill_pipeline.lib import backfill_definitions
from backfill_pipeline.stores import StoreError, open_store

from .graph_helpers import materialized_assets, metadata, register, run_partition, sensor_tick

PLACEHOLDER_384 = [round(0.414 + 0.001 * k, 3) for k in range(384)]


def sql(url: str, statement: str, params: tuple | list = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def migrate(config, *names: str) -> None:
    for name in names or config.datasets:
        with open_store(name, config.datasets[name]) as store:
            store.migrate()


def posting(i: int) -> tuple[str, str, str]:
    roles = ["Data Engineer", "Senior Python Developer", "Digital Marketing Manager", "Partnership Head"]
    title = roles[i % len(roles)]
    return (
        title,
        f"Company {i % 7}",
        (
            f"Posting {i}. We are looking for a {title} to join our team in city {i % 5}. "
            "You will work with Python, SQL and "
            f"stakeholders across the business.\n\nRequirements: {2 + i % 6}+ years of experience."
        ),
    )


def test_jobs_jsonb_placeholders_become_768_in_place(pg_db) -> None:
    url, schema = pg_db
    sql(
        url,
        f'CREATE TABLE "{schema}".jobs_enriched (id bigint PRIMARY KEY, title text, company text, '
        "description text, salary integer, created_at timestamptz DEFAULT now(), embedding jsonb, "
        "skills jsonb, seniority text, summary text, content_hash text, embedding_model text, "
        "embedded_at timestamptz, enriched_at timestamptz)",
    )
    rows = []
    for i in range(1129200, 1129340):
        title, company, description = posting(i)
        embedding = json.dumps(PLACEHOLDER_384) if i % 3 else None
        rows.append((i, title, company, description if i % 29 else "", 50_000 + i % 1000, embedding))
    with psycopg.connect(url) as conn:
        conn.cursor().executemany(
            f'INSERT INTO "{schema}".jobs_enriched (id, title, company, description, salary, embedding) '
            "VALUES (%s, %s, %s, %s, %s, %s::jsonb)",
            rows,
        )
    user_columns = "id, title, company, description, salary, created_at"
    before = sql(url, f'SELECT {user_columns} FROM "{schema}".jobs_enriched ORDER BY id')

    config = parse_config(
        {
            "datasets": {
                "jobs": {
                    "database_url": url,
                    "schema": schema,
                    "table": "jobs_enriched",
                    "text": {"template": "{title} at {company}\n\n{description}", "required_columns": ["description"]},
                    "embedding": {"dimension": 768},
                    "enrichment": {"enabled": True},
                    "partitioning": {"width": 100},
                }
            }
        }
    )
    migrate(config)
    with dg.instance_for_test() as instance:
        keys = register(config, "jobs", instance)
        assert keys == ["0001129200-0001129299", "0001129300-0001129399"]
        for key in keys:
            result = run_partition(config, "jobs", key, instance)
            assert result.success
        detected = metadata(result, "detected_placeholders")
        assert detected["rows_placeholder_sequential"] > 0 and detected["rows_null_embedding"] > 0

    assert sql(url, f'SELECT {user_columns} FROM "{schema}".jobs_enriched ORDER BY id') == before
    counts = sql(
        url,
        f"""SELECT count(*) FILTER (WHERE jsonb_array_length(embedding) = 768),
        count(*) FILTER (WHERE description = ''), count(*) FILTER (WHERE jsonb_typeof(skills) = 'array'
        AND seniority IS NOT NULL AND summary IS NOT NULL AND embedded_at IS NOT NULL), count(*)
        FROM "{schema}".jobs_enriched""",
    )[0]
    with_text = counts[3] - counts[1]
    assert counts[0] == with_text == counts[2] and counts[1] > 0
    # the no-description rows kept their placeholder or NULL untouched
    assert (
        sql(
            url,
            f"""SELECT count(*) FROM "{schema}".jobs_enriched WHERE description = ''
        AND (embedding IS NULL OR jsonb_array_length(embedding) = 384)""",
        )[0][0]
        == counts[1]
    )


def _vector_table(url: str, table: str, dim: int, extra: str = "", kind: str = "vector") -> None:
    sql(
        url,
        f"CREATE TABLE {table} (id bigint PRIMARY KEY, {extra} content text, "
        f"embedding {kind}({dim}), content_hash text, embedding_model text, embedded_at timestamptz)",
    )


def test_documents_by_archive_with_vector_1536(pgvector_db: str) -> None:
    url = pgvector_db
    _vector_table(url, "lovdata_documents", 1536, "archive text, title text,")
    archives = ["gjeldende-lover.tar.bz2", "gjeldende-sentrale-forskrifter.tar.bz2"]
    with psycopg.connect(url) as conn:
        conn.cursor().executemany(
            "INSERT INTO lovdata_documents (id, archive, title, content) VALUES (%s, %s, %s, %s)",
            [
                (i, archives[i % 2], f"Lov {i}", f"Lov om ting nummer {i}. Paragraf {i % 13} gjelder.")
                for i in range(1, 81)
            ],
        )
    config = parse_config(
        {
            "datasets": {
                "documents": {
                    "database_url": url,
                    "table": "lovdata_documents",
                    "archive_column": "archive",
                    "text": {"columns": ["title", "content"]},
                    "embedding": {"dimension": 1536, "batch_size": 16},
                    "partitioning": {"kind": "archive"},
                }
            }
        }
    )
    migrate(config)
    defs = backfill_definitions(config)
    with dg.instance_for_test() as instance:
        tick = sensor_tick(defs, "documents_new_rows_sensor", instance)
        keys = list(tick.dynamic_partitions_requests[0].partition_keys)
        assert keys == ["gjeldende-sentrale-forskrifter-tar-bz2", "gjeldende-lover-tar-bz2"]
        instance.add_dynamic_partitions("documents_partitions", keys)
        result = run_partition(config, "documents", "gjeldende-lover-tar-bz2", instance)
        assert metadata(result, "written_table")["rows_written"] == 40
        assert metadata(result, "embeddings")["provider_requests"] == 3  # 40 rows in batches of 16
        by_archive = dict(sql(url, "SELECT archive, count(embedding) FROM lovdata_documents GROUP BY archive"))
        assert by_archive == {"gjeldende-lover.tar.bz2": 40, "gjeldende-sentrale-forskrifter.tar.bz2": 0}
        assert sql(
            url, "SELECT DISTINCT vector_dims(embedding) FROM lovdata_documents WHERE embedding IS NOT NULL"
        ) == [(1536,)]
        # a new archive arrives: the sensor adds its partition and asks for a run
        sql(
            url,
            "INSERT INTO lovdata_documents (id, archive, title, content) VALUES (81, 'nye-lover.tar.bz2', "
            "'Ny lov', 'Helt ny lov.')",
        )
        grown = sensor_tick(defs, "documents_new_rows_sensor", instance, tick.cursor)
        assert list(grown.dynamic_partitions_requests[0].partition_keys) == ["nye-lover-tar-bz2"]
        assert [r.partition_key for r in grown.run_requests] == ["nye-lover-tar-bz2"]


def test_clips_with_row_filter_and_force(pgvector_db: str) -> None:
    url = pgvector_db
    _vector_table(url, "clips", 768, "is_removed boolean NOT NULL DEFAULT false, created_at timestamptz,")
    with psycopg.connect(url) as conn:
        conn.cursor().executemany(
            "INSERT INTO clips (id, is_removed, content) VALUES (%s, %s, %s)",
            [(i, i % 5 == 0, f"Clip {i}: highlight of match {i % 9}") for i in range(1, 61)],
        )
    data = {
        "datasets": {
            "clips": {
                "database_url": url,
                "table": "clips",
                "row_filter": "is_removed = false",
                "text": {"columns": ["content"]},
                "embedding": {"dimension": 768, "model": "offline-hash-v1"},
                "partitioning": {"width": 1000},
            }
        }
    }
    config = parse_config(data)
    migrate(config)
    with dg.instance_for_test() as instance:
        key = register(config, "clips", instance)[0]
        first = run_partition(config, "clips", key, instance)
        assert metadata(first, "written_table")["rows_written"] == 48
        assert sql(url, "SELECT count(*) FROM clips WHERE is_removed AND embedding IS NOT NULL")[0][0] == 0
        stamps = dict(sql(url, "SELECT id, embedded_at FROM clips WHERE NOT is_removed"))

        idle = run_partition(config, "clips", key, instance)
        assert metadata(idle, "embeddings")["provider_requests"] == 0

        # a model migration: rows embedded by the old model are re-embedded without force
        data["datasets"]["clips"]["embedding"]["model"] = "offline-hash-v2"
        migrated = parse_config(data)
        moved = run_partition(migrated, "clips", key, instance)
        assert metadata(moved, "detected_placeholders")["rows_model_changed"] == 48
        assert sql(url, "SELECT DISTINCT embedding_model FROM clips WHERE NOT is_removed") == [("offline-hash-v2",)]

        forced = run_partition(migrated, "clips", key, instance, force=True)
        assert metadata(forced, "written_table")["rows_written"] == 48
        after = dict(sql(url, "SELECT id, embedded_at FROM clips WHERE NOT is_removed"))
        assert all(after[i] > stamps[i] for i in stamps)


def test_sessions_and_summaries_two_datasets(pgvector_db: str) -> None:
    url = pgvector_db
    sql(
        url,
        "CREATE TABLE sessions (id bigint PRIMARY KEY, user_id text, title text, deleted_at timestamptz, "
        "title_embedding vector(1536))",
    )
    sql(
        url,
        "CREATE TABLE summaries (id bigint PRIMARY KEY, session_id bigint, content text, "
        "deleted_at timestamptz, content_embedding vector(1536))",
    )
    with psycopg.connect(url) as conn:
        conn.cursor().executemany(
            "INSERT INTO sessions (id, user_id, title) VALUES (%s, %s, %s)",
            [(i, f"u{i % 4}", f"Session {i}: sprint planning") for i in range(1, 34)],
        )
        conn.cursor().executemany(
            "INSERT INTO summaries (id, session_id, content) VALUES (%s, %s, %s)",
            [(i, i, f"Summary {i}: we agreed on the roadmap.") for i in range(1, 23)],
        )
    common = {"database_url": url, "partitioning": {"width": 1000}, "row_filter": "deleted_at IS NULL"}
    config = parse_config(
        {
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
                },
            }
        }
    )
    migrate(config)
    with dg.instance_for_test() as instance:
        for name, expected in (("sessions", 33), ("summaries", 22)):
            key = register(config, name, instance)[0]
            assert metadata(run_partition(config, name, key, instance), "written_table")["rows_written"] == expected
    assert sql(url, "SELECT count(*) FROM sessions WHERE vector_dims(title_embedding) = 1536")[0][0] == 33
    assert sql(url, "SELECT count(*) FROM summaries WHERE vector_dims(content_embedding) = 1536")[0][0] == 22
    # the queue-status view of the seed, answered from the tables themselves
    assert sql(url, "SELECT count(*) - count(title_embedding) FROM sessions WHERE deleted_at IS NULL")[0][0] == 0


def test_separate_target_table(pgvector_db: str) -> None:
    url = pgvector_db
    sql(url, "CREATE TABLE articles (id bigint PRIMARY KEY, body text, updated_at timestamptz DEFAULT now())")
    with psycopg.connect(url) as conn:
        conn.cursor().executemany(
            "INSERT INTO articles (id, body) VALUES (%s, %s)",
            [(i, f"Article {i} about vector search") for i in range(1, 31)],
        )
    before = sql(url, "SELECT * FROM articles ORDER BY id")
    config = parse_config(
        {
            "datasets": {
                "articles": {
                    "database_url": url,
                    "table": "articles",
                    "text": {"columns": ["body"]},
                    "target": {"mode": "table", "table": "article_embeddings", "id_column": "article_id"},
                    "embedding": {"dimension": 384},
                    "enrichment": {"enabled": True, "fields": ["skills", "summary"]},
                    "partitioning": {"width": 1000},
                }
            }
        }
    )
    migrate(config)
    types = dict(
        sql(url, "SELECT column_name, udt_name FROM information_schema.columns WHERE table_name = 'article_embeddings'")
    )
    assert types["embedding"] == "vector" and types["skills"] == "jsonb" and types["article_id"] == "int8"
    with dg.instance_for_test() as instance:
        key = register(config, "articles", instance)[0]
        assert metadata(run_partition(config, "articles", key, instance), "written_table")["rows_written"] == 30
        again = run_partition(config, "articles", key, instance)
        assert metadata(again, "written_table")["rows_written"] == 0
    assert sql(url, "SELECT * FROM articles ORDER BY id") == before
    assert sql(url, "SELECT count(*), min(vector_dims(embedding)) FROM article_embeddings WHERE summary IS NOT NULL")[
        0
    ] == (30, 384)


# halfvec needs pgvector >= 0.7; the pgserver wheel ships 0.6.2 and no registry here has a newer build.
@pytest.mark.parametrize("kind", ["real[]", "double precision[]", "jsonb"])
def test_each_column_type_is_read_and_written(pgvector_db: str, kind: str) -> None:
    url = pgvector_db
    column = f"{kind}(8)" if kind == "halfvec" else kind
    sql(
        url,
        f"CREATE TABLE items (id bigint PRIMARY KEY, body text, embedding {column}, content_hash text, "
        "embedding_model text, embedded_at timestamptz)",
    )
    literal = {"halfvec": "'[{}]'::halfvec", "jsonb": "'[{}]'::jsonb"}.get(kind, "'{{{}}}'")
    vectors = {1: [0.0] * 8, 2: [0.1 * k for k in range(1, 9)], 3: [0.5] * 8, 4: None, 5: [0.2, -0.1] * 2}
    for i, v in vectors.items():
        value = "NULL" if v is None else literal.format(",".join(map(str, v)))
        sql(url, f"INSERT INTO items (id, body, embedding) VALUES ({i}, 'item {i}', {value})")
    config = parse_config(
        {
            "datasets": {
                "items": {
                    "database_url": url,
                    "table": "items",
                    "text": {"columns": ["body"]},
                    "embedding": {"dimension": 8},
                    "partitioning": {"width": 100},
                }
            }
        }
    )
    migrate(config)
    with dg.instance_for_test() as instance:
        key = register(config, "items", instance)[0]
        result = run_partition(config, "items", key, instance)
        detected = metadata(result, "detected_placeholders")
        assert (
            detected["rows_placeholder_zero"],
            detected["rows_placeholder_sequential"],
            detected["rows_placeholder_constant"],
            detected["rows_null_embedding"],
            detected["rows_wrong_dimension"],
        ) == (1, 1, 1, 1, 1)
        assert metadata(result, "written_table")["rows_written"] == 5
    stored = sql(url, "SELECT embedding::text FROM items ORDER BY id")
    for (text,) in stored:
        values = np.fromstring(text.strip("[]{}"), sep=",")
        assert values.shape == (8,) and abs(np.linalg.norm(values) - 1) < 1e-2


def test_dimension_that_does_not_fit_fails_before_any_provider_call(pgvector_db: str) -> None:
    url = pgvector_db
    _vector_table(url, "docs", 768)
    sql(url, "INSERT INTO docs (id, content) VALUES (1, 'hello')")
    config = parse_config(
        {
            "datasets": {
                "docs": {
                    "database_url": url,
                    "table": "docs",
                    "text": {"columns": ["content"]},
                    "embedding": {"dimension": 1536},
                    "partitioning": {"width": 100},
                }
            }
        }
    )
    with open_store("docs", config.datasets["docs"]) as store:
        store.migrate()
        with pytest.raises(StoreError, match=r"docs.embedding is vector\(768\) but embedding.dimension is 1536"):
            store.check_schema()
    with dg.instance_for_test() as instance:
        key = register(config, "docs", instance)[0]
        job = backfill_definitions(config).resolve_job_def("docs_backfill_job")
        result = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False)
        assert not result.success
        assert materialized_assets(result) == set()  # raw_rows failed: no provider step ever ran
        failure = result.get_step_failure_events()[0].event_specific_data.error
        assert "vector(768) but embedding.dimension is 1536" in str(failure.cause or failure)


def test_missing_columns_are_reported_not_added(pg_db) -> None:
    url, schema = pg_db
    sql(url, f'CREATE TABLE "{schema}".notes (id integer PRIMARY KEY, body text)')
    config = parse_config(
        {
            "datasets": {
                "notes": {
                    "database_url": url,
                    "schema": schema,
                    "table": "notes",
                    "text": {"columns": ["body"]},
                    "embedding": {"dimension": 16},
                    "enrichment": {"enabled": True},
                }
            }
        }
    )
    with open_store("notes", config.datasets["notes"]) as store:
        with pytest.raises(StoreError) as info:
            store.check_schema()
        assert "notes.embedding" in str(info.value) and "notes.skills" in str(info.value)
        assert "migrate" in str(info.value)
        assert (
            sql(
                url,
                "SELECT count(*) FROM information_schema.columns WHERE table_schema = %s AND table_name = 'notes'",
                [schema],
            )[0][0]
            == 2
        )
        added = store.migrate()
        assert "notes.embedding" in added and "backfill_failures (table)" in added
    types = dict(
        sql(
            url,
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'notes'",
            [schema],
        )
    )
    assert types["embedding"] == "ARRAY" and types["skills"] == "jsonb"  # no pgvector here: real[]
    assert types["embedded_at"] == "timestamp with time zone"
