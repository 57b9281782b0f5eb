"""Unthrottled throughput: the pipeline's own cost per row, side by side with pgai's vectorizer worker.

``--rows`` documents (default 100,000) of ~500 characters, embedding only at 768 dimensions, against the
loopback OpenAI-wire server with no limits and no latency, answering with vectors picked from a fixed set
by each text's hash (computing them would make the server, which shares the two cores, what is measured),
into Postgres 16 + pgvector (pgserver). Each
contender has a table of its own holding the same documents and is timed from launch to exit:

- this project: ``backfill-pipeline materialize --parallel N``;
- pgai: ``pgai vectorizer worker -d URL --once`` (``chunking_none``, ``destination_column``; see
  ``bench/at_the_limit.py`` for how it is installed, given with ``--pgai``);
- for scale: a bare ``COPY ... FORMAT BINARY`` of the same number of 768-dim vectors into a temporary table.

It prints rows/s for each and this project's ratio to pgai (targets: at least 10,000 rows/s, at least 3x pgai).

usage: python bench/throughput.py [--rows 100000] [--parallel 4] [--pgai PATH] [--pgai-concurrency N]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from at_the_limit import LINKS, TERMS, load, ours, pgai  # noqa: E402

from backfill_pipeline_tests.fake_providers import FakeProviderServer  # noqa: E402
from backfill_pipeline_tests.pg import OwnedCluster, create_database  # noqa: E402

DIM = 768


def documents(n: int) -> list[str]:
    rng = random.Random(7)
    return [f"Note {i}. " + " ".join(rng.choices(TERMS + LINKS, k=70)) for i in range(n)]


def bare_copy(url: str, rows: int) -> float:
    """Seconds to COPY ``rows`` random 768-dim vectors in binary into a fresh table."""
    from pgvector.psycopg import register_vector

    vectors = np.random.default_rng(1).standard_normal((rows, DIM)).astype(np.float32)
    with psycopg.connect(url) as conn:
        register_vector(conn)
        conn.execute(f"CREATE TEMP TABLE bare (id bigint, embedding vector({DIM}))")
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy("COPY bare (id, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "vector"])
            for i, vector in enumerate(vectors):
                copy.write_row((i, vector))
        conn.commit()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--parallel", type=int, default=4, help="this project's partitions at once")
    parser.add_argument("--rows-in-memory", type=int, help="the dataset setting (default: its own)")
    parser.add_argument("--pgai", help="the pgai command of a venv with pgai[vectorizer-worker] installed")
    parser.add_argument("--pgai-concurrency", type=int, help="the worker's -c (default: its own)")
    args = parser.parse_args()

    cluster = OwnedCluster()
    try:
        url = create_database(cluster.url(), extensions=("vector",))
        docs = documents(args.rows)
        for table in ("docs_ours", "docs_pgai"):
            load(url, table, docs)
        print(
            f"{args.rows:,} documents of {sum(map(len, docs)) / len(docs):,.0f} characters, {DIM} dims, "
            "a server with no limits and no latency",
            flush=True,
        )
        copy_seconds = bare_copy(url, args.rows)
        print(f"bare COPY FORMAT BINARY of {args.rows:,} vectors: {args.rows / copy_seconds:,.0f} rows/s", flush=True)
        rates: dict[str, float] = {}
        runs = [
            (
                "backfill",
                "docs_ours",
                lambda s: ours(url, s, args.rows, args.parallel, limited=False, in_memory=args.rows_in_memory),
            )
        ]
        if args.pgai:
            runs.append(("pgai 0.12", "docs_pgai", lambda s: pgai(url, s, args.pgai, args.pgai_concurrency)))
        for name, table, launch in runs:
            server = FakeProviderServer()
            server.cheap = True  # vectors picked, not computed: the server's own cost stays small
            server.start()
            try:
                _, seconds = launch(server)
                busy = server.stats.inputs_per_request
                with psycopg.connect(url) as conn:
                    done = conn.execute(f"SELECT count(*) FROM {table} WHERE embedding IS NOT NULL").fetchone()[0]
            finally:
                server.stop()
            rates[name] = done / seconds
            print(
                f"{name:<10} {done:>9,} rows in {seconds:6.1f}s = {done / seconds:8,.0f} rows/s "
                f"({len(busy):,} requests)",
                flush=True,
            )
        if "pgai 0.12" in rates:
            print(f"this project / pgai = {rates['backfill'] / rates['pgai 0.12']:.2f} (target >= 3)")
        print(f"this project: {rates['backfill']:,.0f} rows/s (target >= 10,000)")
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
