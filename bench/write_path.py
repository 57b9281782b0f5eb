"""Write-path benchmark: the Postgres store's in-place write against a bare COPY ... FORMAT BINARY.

100,000 rows of 768-dim vectors. The store stages each batch with COPY BINARY into a temporary table and
applies it with one UPDATE ... FROM per batch, one transaction each; the baseline COPYs the same vectors
(same columns, same encoder) into an empty table of the same shape in one transaction. Both run in this
process against the same server, so the ratio is what matters.

usage: python bench/write_path.py [--rows N] [--batch-size B ...] [--url postgresql://...]
Without --url it starts a throw-away Postgres 16 + pgvector from the pgserver wheel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
from pgvector.psycopg import register_vector

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backfill_pipeline.config import parse_config  # noqa: E402
from backfill_pipeline.rows import matrix_array  # noqa: E402
from backfill_pipeline.stores import open_store  # noqa: E402

DIM = 768


def prepare(url: str, rows: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        for table in ("bench_items", "bench_copy"):
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(
                f"CREATE TABLE {table} (id bigint PRIMARY KEY, body text, embedding vector({DIM}), "
                "content_hash text, embedding_model text, embedded_at timestamptz)"
            )
        conn.execute(
            "INSERT INTO bench_items (id, body) SELECT g, 'posting number ' || g FROM generate_series(1, %s) g",
            [rows],
        )
        conn.execute("VACUUM ANALYZE bench_items")


def results_table(rows: int) -> pa.Table:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(rows, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    now = datetime.now(timezone.utc).isoformat()
    return pa.table(
        {
            "id": pa.array(np.arange(1, rows + 1), pa.int64()),
            "embedding": matrix_array(vectors),
            "content_hash": pa.array([f"{i:064x}" for i in range(rows)]),
            "model": pa.array(["text-embedding-3-small"] * rows),
            "embedded_at": pa.array([now] * rows),
        }
    )


def bare_copy(url: str, results: pa.Table) -> float:
    ids = results.column("id").to_pylist()
    vectors = results.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    hashes = results.column("content_hash").to_pylist()
    now = datetime.now(timezone.utc)
    with psycopg.connect(url) as conn:
        register_vector(conn)
        started = time.perf_counter()
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY bench_copy (id, embedding, content_hash, embedding_model, embedded_at) FROM STDIN (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(["int8", "vector", "text", "text", "timestamptz"])
            for i, row_id in enumerate(ids):
                copy.write_row([row_id, vectors[i], hashes[i], "text-embedding-3-small", now])
        conn.commit()
        return time.perf_counter() - started


def store_write(url: str, results: pa.Table, batch_size: int, concurrency: int) -> tuple[float, int]:
    config = parse_config(
        {
            "datasets": {
                "bench": {
                    "database_url": url,
                    "table": "bench_items",
                    "text": {"columns": ["body"]},
                    "embedding": {"dimension": DIM},
                    "write_concurrency": concurrency,
                }
            }
        }
    )
    with open_store("bench", config.datasets["bench"]) as store:
        store.migrate()
        store.check_schema()
        started = time.perf_counter()
        stats = store.rows.write_results(results, batch_size)
        return time.perf_counter() - started, stats.rows_written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--repeat", type=int, default=3, help="runs per setting; the median is reported")
    parser.add_argument("--url")
    args = parser.parse_args()

    cluster = None
    url = args.url
    if url is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from backfill_pipeline_tests.pg import OwnedCluster, create_database

        cluster = OwnedCluster()
        url = create_database(cluster.url(), extensions=("vector",))
    try:
        results = results_table(args.rows)
        print(f"{args.rows:,} rows of {DIM}-dim float32 vectors, in place, against {url.rsplit('@', 1)[-1]}")
        print(f"each figure is the median of {args.repeat} runs; baseline and store runs alternate")
        for batch_size in args.batch_size:
            for concurrency in args.concurrency:
                base_times, store_times = [], []
                for _ in range(args.repeat):
                    prepare(url, args.rows)
                    base_times.append(bare_copy(url, results))
                    seconds, written = store_write(url, results, batch_size, concurrency)
                    assert written == args.rows, written
                    store_times.append(seconds)
                baseline, seconds = statistics.median(base_times), statistics.median(store_times)
                base_rate, store_rate = args.rows / baseline, args.rows / seconds
                print(
                    f"batch {batch_size:>5}, {concurrency} connection(s): bare COPY BINARY {base_rate:>7,.0f} rows/s | "
                    f"store write {store_rate:>7,.0f} rows/s | ratio {store_rate / base_rate:.0%}"
                )
    finally:
        if cluster is not None:
            cluster.destroy()


if __name__ == "__main__":
    main()
