"""Table-wide work: the refresh schedule's tick, `coverage` and `plan`, at 10, 100 and 1,000 partitions.

The schedule's tick (and the sensor's first tick) ask one aggregate query grouped by partition
(``partitions.pending_partitions``: missing, old-model, wrong-length and zero vectors, text whose hash
changed, missing enrichment, failures cooling down), instead of reading and detecting every partition in
Python; ``coverage`` and ``plan`` count with one aggregate query and read only the rows needing work.
The baseline is that older way (``coverage.partition_coverage`` per partition), run in the same
process on the same table at the smallest partition count (it does not depend on the count).

The table holds ``--rows`` rows with ~200-character texts and ``--dim``-dimension ``real[]`` vectors, all
up to date but for one row in every 1,000 (so partitions needing work are found among many that do not).

usage: python bench/schedule_tick.py [--rows N] [--dim D] [--no-baseline] [--url postgresql://...]
Without --url it uses the Postgres at 127.0.0.1:5432, else starts one from the pgserver wheel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backfill_pipeline.cli_tables import coverage_rows  # noqa: E402
from backfill_pipeline.config import parse_config  # noqa: E402
from backfill_pipeline.coverage import partition_coverage  # noqa: E402
from backfill_pipeline.partitions import partition_activity, partition_spec, pending_partitions  # noqa: E402
from backfill_pipeline.plan import plan_dataset  # noqa: E402
from backfill_pipeline.stores import open_store  # noqa: E402

MODEL = "offline-hash-v1"


def server_url(given: str | None) -> tuple[str, object | None]:
    if given:
        return given, None
    try:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=3):
            return "postgresql://postgres@127.0.0.1:5432/postgres", None
    except psycopg.OperationalError:
        import pgserver

        folder = Path(f"/tmp/bench_tick_{uuid.uuid4().hex[:8]}")
        server = pgserver.get_server(folder, cleanup_mode="delete")
        return server.get_uri(), server


def prepare(url: str, rows: int, dim: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_docs")
        conn.execute(
            "CREATE TABLE bench_docs (id bigint PRIMARY KEY, body text, embedding real[], content_hash text, "
            "embedding_model text, embedded_at timestamptz)"
        )
        conn.execute(
            "INSERT INTO bench_docs (id, body) SELECT g, 'Document ' || g || ': ' || repeat('lorem ipsum ', 16) "
            "|| 'dolor' FROM generate_series(0, %s - 1) g",
            [rows],
        )
        vector = "ARRAY(SELECT (random() - 0.5)::real FROM generate_series(1, %s))"
        conn.execute(
            f"UPDATE bench_docs SET embedding = {vector}, content_hash = encode(sha256(convert_to(body, 'UTF8')), "
            "'hex'), embedding_model = %s, embedded_at = now() WHERE id %% 1000 <> 0",
            [dim, MODEL],
        )
        conn.execute("VACUUM ANALYZE bench_docs")


def read_every_partition(store, config, keys: list[str]) -> None:
    """The old tick: every partition read and run through detection in Python."""
    for key in keys:
        partition_coverage(store, config, partition_spec(key, config, store.rows), exact=True)


def check_step(store, config, key: str) -> str:
    """The written table's checks on one partition: counted by the database (only rows needing work read)
    against reading and detecting every row of it, as the checks did before."""
    part = partition_spec(key, config, store.rows)
    counted = median_seconds(lambda: partition_coverage(store, config, part))
    exact = median_seconds(lambda: partition_coverage(store, config, part, exact=True), repeat=1)
    rows = partition_coverage(store, config, part).rows
    return (
        f"the checks on one partition of {rows:,} rows: {counted:.2f}s counted, {exact:.2f}s read = "
        f"{exact / counted:.0f}x"
    )


def median_seconds(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--url")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    base_url, server = server_url(args.url)
    database = f"bench_tick_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    url = base_url.rsplit("/", 1)[0] + f"/{database}"
    try:
        started = time.perf_counter()
        prepare(url, args.rows, args.dim)
        print(f"{args.rows:,} rows x {args.dim} dims prepared in {time.perf_counter() - started:.1f}s")
        baseline = None
        for partitions in (10, 100, 1000):
            width = -(-args.rows // partitions)
            data = {"database_url": url, "table": "bench_docs", "text": {"columns": ["body"]}}
            data |= {"embedding": {"dimension": args.dim, "model": MODEL}, "partitioning": {"width": width}}
            config = parse_config({"datasets": {"docs": data}}).datasets["docs"]
            with open_store("docs", config) as store:
                store.migrate()
                found = pending_partitions(store.rows, config)
                seconds = median_seconds(lambda: pending_partitions(store.rows, config))  # noqa: B023
                keys = [k for k, _ in partition_activity(store.rows, config)]
                covered = median_seconds(lambda: coverage_rows("docs", config, by_partition=True))  # noqa: B023
                planned = median_seconds(lambda: plan_dataset("docs", config))  # noqa: B023
                line = (
                    f"{len(keys):>5} partitions: schedule tick {seconds:6.2f}s, coverage {covered:6.2f}s, "
                    f"plan {planned:6.2f}s (medians of 3); {len(found)} partitions with "
                    f"{sum(n for _, n in found):,} rows needing work"
                )
                if baseline is None and not args.no_baseline:
                    baseline = median_seconds(lambda: read_every_partition(store, config, keys), repeat=1)  # noqa: B023
                    line += f"; reading every partition (the old tick) {baseline:.2f}s = {baseline / seconds:.1f}x"
                print(line, flush=True)
                if partitions == 10:
                    print(check_step(store, config, keys[0]), flush=True)
    finally:
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        if server is not None:
            server.cleanup()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
