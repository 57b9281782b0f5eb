"""A partition wider than ``rows_in_memory`` streams through the graph in windows: the engine never holds
more rows than a window, the intermediates are written in row groups, and what spans windows stays right
(each failure recorded against its own row, a text repeated in two windows paid once, ``--limit`` counted
over the whole partition)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from backfill_pipeline import provider_steps
from backfill_pipeline.spool import SpoolWriter, rows_where, windows

from .conftest import query
from .graph_helpers import metadata, register, run_partition
from .test_provider_graph import provider_config, setup

WINDOW = 100


def _wide_partition(demo_db: Path, tmp_path: Path, server, monkeypatch):
    data = provider_config(demo_db, server, rows_in_memory=WINDOW)
    data["datasets"]["jobs"]["partitioning"]["width"] = 1000  # all 300 rows in one partition
    _, config = setup(tmp_path, data, monkeypatch)
    return config


def test_a_partition_streams_through_the_graph_in_windows(demo_db, tmp_path, server, monkeypatch, instance) -> None:
    conn = sqlite3.connect(demo_db)
    conn.execute("UPDATE job_postings SET description = description || ' FAULT:schema' WHERE id IN (5, 150, 290)")
    conn.execute(  # the same text in the first and the third window
        "UPDATE job_postings SET title = (SELECT title FROM job_postings WHERE id = 12), "
        "company = (SELECT company FROM job_postings WHERE id = 12), "
        "description = (SELECT description FROM job_postings WHERE id = 12) WHERE id = 250"
    )
    conn.commit()
    conn.close()
    config = _wide_partition(demo_db, tmp_path, server, monkeypatch)
    seen: list[int] = []
    real = provider_steps.embed_texts

    async def recording(provider, texts, **kwargs):
        seen.append(len(texts))
        return await real(provider, texts, **kwargs)

    monkeypatch.setattr(provider_steps, "embed_texts", recording)
    (key,) = register(config, "jobs", instance)
    result = run_partition(config, "jobs", key, instance, force=True)

    embed = metadata(result, "embeddings")
    assert embed["rows_in"] > 2 * WINDOW and len(seen) >= 3 and max(seen) <= WINDOW, seen
    assert sum(seen) == embed["rows_in"]
    written = metadata(result, "written_table")
    with_text = query(demo_db, "SELECT count(*) FROM job_postings WHERE description != ''")[0][0]
    assert written["rows_enrichment_failed"] == 3
    assert written["rows_written"] == with_text  # failed enrichments still get their embedding
    failures = query(demo_db, "SELECT row_id, stage, error_class FROM backfill_failures ORDER BY CAST(row_id AS int)")
    assert failures == [(str(i), "enrichment", "invalid_output") for i in (5, 150, 290)]
    assert server.repeated_texts("chat") == 0 and server.repeated_texts("embeddings") == 0
    row_12, row_250 = (query(demo_db, f"SELECT embedding FROM job_postings WHERE id = {i}")[0][0] for i in (12, 250))
    assert row_12 == row_250

    folder = Path(instance.storage_directory()) / "backfill_parquet" / "jobs" / "embeddings" / key
    (stored,) = folder.iterdir()
    assert pq.ParquetFile(stored).num_row_groups >= 3  # written a window at a time


def test_limit_counts_over_the_whole_partition(demo_db, tmp_path, server, monkeypatch, instance) -> None:
    config = _wide_partition(demo_db, tmp_path, server, monkeypatch)
    (key,) = register(config, "jobs", instance)
    result = run_partition(config, "jobs", key, instance, force=True, limit=150)
    detected = metadata(result, "detected_placeholders")
    assert detected["rows_needing_embedding"] == 150
    assert detected["rows_deferred_by_limit"] == detected["rows_in"] - 150 - detected["rows_no_text"]
    assert metadata(result, "embeddings")["rows_in"] == 150
    assert metadata(result, "written_table")["rows_written"] == 150


def test_windows_regroup_sparse_batches_into_full_windows() -> None:
    parts = [pa.table({"i": list(range(start, start + n))}) for start, n in ((0, 3), (3, 0), (3, 9), (12, 2))]
    out = list(windows(iter(parts), 5))
    assert [t.num_rows for t in out] == [5, 5, 4]
    assert sum((t.column("i").to_pylist() for t in out), []) == list(range(14))

    writer = SpoolWriter(pa.schema([("id", pa.int64()), ("flag", pa.bool_())]))
    for start in range(0, 30, 10):
        writer.write(pa.table({"id": list(range(start, start + 10)), "flag": [i % 3 == 0 for i in range(10)]}))
    spool = writer.finish()
    picked = [t.column("id").to_pylist() for t in rows_where(spool, "flag", 4, ["id"])]
    assert picked == [[0, 3, 6, 9], [10, 13, 16, 19], [20, 23, 26, 29]]
    spool.discard()
    assert not spool.path.exists()
