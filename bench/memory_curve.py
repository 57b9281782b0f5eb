"""Memory benchmark: peak RSS of one partition's run against the partition's width.

For each size (default 1,000 / 10,000 / 100,000 rows), a table of ~2 KB texts with no embeddings in a
Postgres 16 + pgvector of its own (``vector(1536)``), one partition holding every row, embedding only
(``text-embedding-3-small`` at 1,536 dimensions on the loopback OpenAI-wire server, no limits). The run
is launched the way a user would (``backfill-pipeline materialize``, the whole graph in one process), through
``bench/rss_sampler.py``, which reads the kernel's peak RSS of that process as it exits (``VmHWM``) and
samples RSS against the step running (``--steps`` prints each step's peak).

It prints each size's peak, time and rate, and the ratio of the widest partition's peak to the
narrowest's (target: under 1 GiB at 100,000 rows, within 20% of the 1,000-row figure).

usage: python bench/memory_curve.py [--sizes 1000,10000,100000] [--dim 1536] [--rows-in-memory N] [--steps]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backfill_pipeline_tests.fake_providers import OPENAI_KEY, FakeProviderServer  # noqa: E402
from backfill_pipeline_tests.pg import OwnedCluster, create_database  # noqa: E402

WORDS = [
    "the",
    "court",
    "held",
    "that",
    "contract",
    "party",
    "claim",
    "appeal",
    "section",
    "act",
    "liability",
    "damages",
    "notice",
    "evidence",
    "tribunal",
    "plaintiff",
    "defendant",
    "agreement",
    "clause",
    "statute",
    "ruling",
    "judgment",
    "payment",
    "property",
    "lease",
    "employer",
    "employee",
]


def load(url: str, rows: int, dim: int, chars: int) -> None:
    rng = random.Random(rows)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE docs (id bigint PRIMARY KEY, body text, embedding vector({dim}))")
        with conn.cursor() as cur, cur.copy("COPY docs (id, body) FROM STDIN") as copy:
            for i in range(rows):
                words = rng.choices(WORDS, k=chars // 6)  # ~6 characters a word with its space
                copy.write_row((i, f"Document {i}. " + " ".join(words)))
        conn.execute("VACUUM ANALYZE docs")


def config(url: str, server: FakeProviderServer, rows: int, dim: int, in_memory: int | None) -> dict:
    dataset: dict = {
        "database_url": url,
        "table": "docs",
        "text": {"template": "{body}"},
        "partitioning": {"width": rows},
        "embedding": {
            "provider": "openai",
            "model": "text-embedding-3-small",
            "dimension": dim,
            "base_url": server.openai_url,
            "batch_size": 256,
            "max_in_flight": 8,
        },
    }
    if in_memory:
        dataset["rows_in_memory"] = in_memory
    return {"datasets": {"docs": dataset}}


def run(command: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(seconds, exit status) of one command, its output dropped (its errors shown if it fails)."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode:
        sys.stderr.write(done.stderr.decode(errors="replace")[-3000:])
    return time.perf_counter() - started, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--chars", type=int, default=2000, help="characters per text")
    parser.add_argument("--rows-in-memory", type=int, default=None, help="the dataset setting (default: its own)")
    parser.add_argument("--memray", metavar="FOLDER", help="also record each run with memray (pip install memray)")
    parser.add_argument("--steps", action="store_true", help="sample RSS every 50 ms: each step's peak")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    server = FakeProviderServer().start()
    cluster = OwnedCluster()
    cli = str(Path(sys.executable).parent / "backfill-pipeline")
    figures: list[tuple[int, float, float]] = []
    try:
        for rows in sizes:
            work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
            url = create_database(cluster.url(), extensions=("vector",))
            load(url, rows, args.dim, args.chars)
            (work / "home").mkdir()
            settings = config(url, server, rows, args.dim, args.rows_in_memory)
            (work / "backfill.yaml").write_text(yaml.safe_dump(settings))
            env = {
                **os.environ,
                "BACKFILL_CONFIG": str(work / "backfill.yaml"),
                "DAGSTER_HOME": str(work / "home"),
                "OPENAI_API_KEY": OPENAI_KEY,
            }
            for step in ("migrate", "register"):
                subprocess.run([cli, step], env=env, check=True, capture_output=True)
            steps_file = work / "steps.json"
            command = [sys.executable, str(ROOT / "bench" / "rss_sampler.py"), "materialize", "--yes"]
            env["RSS_STEPS"] = str(steps_file)
            if args.memray:
                memray = Path(sys.executable).parent / "memray"
                command = [str(memray), "run", "--force", "-o", f"{args.memray}/{rows}.bin", *command[1:]]
            seconds, status = run(command, env)
            if status:
                raise SystemExit(f"the run of {rows:,} rows failed (exit {status})")
            with psycopg.connect(url) as conn:
                done = conn.execute("SELECT count(*) FROM docs WHERE embedding IS NOT NULL").fetchone()[0]
            if done != rows:
                raise SystemExit(f"only {done:,} of {rows:,} rows embedded")
            peaks = json.loads(steps_file.read_text())
            mib = peaks.pop("peak RSS (VmHWM)")
            figures.append((rows, mib, seconds))
            print(
                f"{rows:>9,} rows x {args.dim} dims, ~{args.chars:,}-char texts: peak RSS {mib:,.0f} MiB, "
                f"{seconds:.1f}s ({rows / seconds:,.0f} rows/s end to end, start-up included)",
                flush=True,
            )
            if args.steps:
                print("    peak by step: " + ", ".join(f"{k} {v:,.0f} MiB" for k, v in peaks.items()), flush=True)
    finally:
        server.stop()
        cluster.destroy()
    (small, small_mib, _), (large, large_mib, _) = figures[0], figures[-1]
    print(
        f"peak at {large:,} rows / peak at {small:,} rows = {large_mib / small_mib:.2f} "
        f"(target <= 1.20); {large:,} rows {'under' if large_mib < 1024 else 'OVER'} 1 GiB"
    )


if __name__ == "__main__":
    main()
