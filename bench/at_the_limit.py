"""At a provider's token limit, side by side: this project, Timescale's pgai vectorizer worker, a plain loop.

10,000 legal-style documents (~4,200 characters, ~820 tokens each), embedding only
(``text-embedding-3-small`` at 768 dimensions) against the loopback OpenAI-wire server at 5,000 RPM and
5,000,000 TPM, 150 ms a request, metering each request the way OpenAI does (its characters / 4, here ~1.28x
the tokenizer's count), in a bucket of ``--server-burst`` seconds of budget (2: a provider that allows almost
no burst; 60: OpenAI's minute). Each contender gets a server of its own (a full bucket) and a table of its
own holding the same documents, in one Postgres 16 + pgvector (pgserver), and is timed from its launch to
its exit, start-up included:

- this project: ``backfill-pipeline materialize --parallel N`` (the run's budget in the database);
- pgai: ``pgai vectorizer worker -d URL --once`` after ``pgai install`` and ``ai.create_vectorizer(...)`` with
  ``chunking_none()`` and ``destination_column``, one chunk per document written into the table (pgai is
  not a dependency: give ``--pgai`` the ``pgai`` command of a venv holding ``pip install "pgai[vectorizer-worker]"``);
- a plain loop: 100 texts per call, one UPDATE per row, the SDK's own retries.

It prints, per contender, rows/s, its ratio to the ceiling the limits allow (the server's own count of the
tokens sent, less what its full bucket admits at once, at the token rate) and the share of requests
answered 429; then this project's ratio to pgai (target: at least 1.0, with at most 2% 429s).

usage: python bench/at_the_limit.py [--rows 10000] [--server-burst 2] [--parallel 4] [--pgai PATH]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import yaml
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backfill_pipeline_tests.fake_providers import OPENAI_KEY, FakeProviderServer, ModelLimits  # noqa: E402
from backfill_pipeline_tests.pg import OwnedCluster, create_database  # noqa: E402

MODEL, DIM, RPM, TPM = "text-embedding-3-small", 768, 5000, 5_000_000
TERMS = [
    "notwithstanding",
    "indemnification",
    "hereinafter",
    "aforementioned",
    "jurisdiction",
    "arbitration",
    "counterclaim",
    "subrogation",
    "liability",
    "enforceability",
    "severability",
    "confidentiality",
    "representations",
    "warranties",
    "covenants",
    "termination",
    "assignment",
    "amendment",
    "governing",
    "construed",
    "pursuant",
    "thereto",
    "whereof",
    "herein",
    "therein",
    "hereby",
    "respective",
    "obligations",
    "consideration",
    "successors",
    "assigns",
    "provisions",
    "agreement",
    "contractor",
    "licensee",
    "licensor",
    "tribunal",
    "plaintiff",
    "defendant",
    "appellant",
    "respondent",
    "injunctive",
    "equitable",
    "remedies",
    "damages",
    "statutory",
    "regulation",
    "compliance",
    "disclosure",
    "proceedings",
    "judgment",
    "enforcement",
]
LINKS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "on",
    "shall",
    "be",
    "any",
    "such",
    "party",
    "this",
    "section",
    "court",
    "may",
    "not",
    "or",
    "by",
    "with",
    "from",
    "under",
    "as",
    "at",
    "which",
    "its",
    "their",
    "no",
    "each",
    "other",
    "if",
    "all",
]


def _citation(rng: random.Random) -> str:
    return rng.choice(
        [
            f"{rng.randint(1, 50)} U.S.C. § {rng.randint(100, 9999)}({rng.choice('abcd')})({rng.randint(1, 9)})",
            f"Art. {rng.randint(1, 99)}.{rng.randint(1, 9)}",
            f"[{rng.randint(1990, 2025)}] EWCA Civ {rng.randint(1, 2000)}",
            f"para. {rng.randint(1, 300)};",
        ]
    )


def documents(n: int) -> list[str]:
    """Terms of art, the words between them and citations: ~4,200 characters, ~820 tokens (1.28x more by
    characters / 4 than by the tokenizer, like legal text)."""
    rng = random.Random(13)

    def word() -> str:
        roll = rng.random()
        return _citation(rng) if roll < 0.035 else rng.choice(TERMS) if roll < 0.37 else rng.choice(LINKS)

    return [f"Agreement {i}. " + " ".join(word() for _ in range(600)) + "." for i in range(n)]


def limits(burst: float) -> dict[str, ModelLimits]:
    return {
        MODEL: ModelLimits(
            requests_per_minute=RPM,
            tokens_per_minute=TPM,
            latency_seconds=0.15,
            burst_seconds=burst,
            meter="characters",
        )
    }


def load(url: str, table: str, docs: list[str]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, body text, embedding vector({DIM}))")
        with conn.cursor() as cur, cur.copy(f"COPY {table} (id, body) FROM STDIN") as copy:
            for i, body in enumerate(docs, 1):
                copy.write_row((i, body))


def ours(
    url: str, server: FakeProviderServer, rows: int, parallel: int, limited: bool = True, in_memory: int | None = None
) -> tuple[float, float]:
    work = Path(tempfile.mkdtemp(prefix="bench-limit-"))
    dataset = {
        "database_url": url,
        "table": "docs_ours",
        "text": {"template": "{body}"},
        "partitioning": {"width": -(-rows // parallel)},
        "embedding": {
            "provider": "openai",
            "model": MODEL,
            "dimension": DIM,
            "base_url": server.openai_url,
        },
    }
    if in_memory:
        dataset["rows_in_memory"] = in_memory
    if limited:
        dataset["embedding"]["rate_limit"] = {"requests_per_minute": RPM, "tokens_per_minute": TPM}
    (work / "backfill.yaml").write_text(yaml.safe_dump({"datasets": {"docs": dataset}}))
    (work / "home").mkdir()
    env = {
        **os.environ,
        "BACKFILL_CONFIG": str(work / "backfill.yaml"),
        "DAGSTER_HOME": str(work / "home"),
        "OPENAI_API_KEY": OPENAI_KEY,
    }
    cli = str(Path(sys.executable).parent / "backfill-pipeline")
    for step in ("migrate", "register"):
        subprocess.run([cli, step], env=env, check=True, capture_output=True)
    return timed([cli, "materialize", "--yes", "--parallel", str(parallel)], env)


def pgai(url: str, server: FakeProviderServer, command: str, concurrency: int | None) -> tuple[float, float]:
    # offline, tiktoken needs the cache pgai bundles (it would download its encodings otherwise)
    cache = next(Path(command).resolve().parents[1].glob("lib/python*/site-packages/pgai/vectorizer/tiktoken_cache"))
    env = {**os.environ, "OPENAI_API_KEY": OPENAI_KEY, "TIKTOKEN_CACHE_DIR": str(cache)}
    subprocess.run([command, "install", "-d", url], env=env, check=True, capture_output=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "SELECT ai.create_vectorizer('docs_pgai'::regclass, loading => ai.loading_column('body'), "
            "embedding => ai.embedding_openai(%s, %s, base_url => %s), chunking => ai.chunking_none(), "
            "destination => ai.destination_column('embedding'), formatting => ai.formatting_python_template('$chunk'))",
            [MODEL, DIM, server.openai_url],
        )
    extra = ["-c", str(concurrency)] if concurrency else []
    return timed([command, "vectorizer", "worker", "-d", url, "--once", *extra], env)


def plain_loop(url: str, server: FakeProviderServer) -> tuple[float, float]:
    client = OpenAI(api_key=OPENAI_KEY, base_url=server.openai_url)
    launched, started = time.time(), time.perf_counter()
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id, body FROM docs_loop ORDER BY id").fetchall()
        for start in range(0, len(rows), 100):
            chunk = rows[start : start + 100]
            answer = client.embeddings.create(model=MODEL, input=[b for _, b in chunk], dimensions=DIM)
            for (row_id, _), item in zip(chunk, answer.data, strict=True):
                conn.execute("UPDATE docs_loop SET embedding = %s::vector WHERE id = %s", [str(item.embedding), row_id])
            conn.commit()
    return launched, time.perf_counter() - started


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall-clock time of the launch, seconds to the exit) of one command, which must succeed."""
    launched, started = time.time(), time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode:
        sys.stderr.write(done.stderr.decode(errors="replace")[-3000:])
        raise SystemExit(f"{command[0]} failed (exit {done.returncode})")
    return launched, time.perf_counter() - started


def report(
    name: str,
    url: str,
    table: str,
    server: FakeProviderServer,
    started: float,
    seconds: float,
    burst: float,
    timeline: bool = False,
) -> float:
    with psycopg.connect(url) as conn:
        done = conn.execute(f"SELECT count(*) FROM {table} WHERE embedding IS NOT NULL").fetchone()[0]
    tokens = sum(t for _, route, _, t in server.stats.accepted_at if route == "embeddings")
    answered = server.count("embeddings", 200)
    limited = server.count("embeddings", 429)
    rate = TPM / 60
    ceiling_seconds = max(0.0, tokens - burst * rate) / rate
    print(
        f"{name:<14} {done:>7,} rows in {seconds:6.1f}s = {done / seconds:6.1f} rows/s "
        f"({done / seconds / (done / ceiling_seconds):6.1%} of the ceiling {done / ceiling_seconds:.1f} rows/s "
        f"for its {tokens:,} tokens metered); {limited} of {answered + limited} requests answered 429 "
        f"({limited / max(answered + limited, 1):.1%})",
        flush=True,
    )
    accepted = [(at, t) for at, route, _, t in server.stats.accepted_at if route == "embeddings"]
    first, last = min(accepted)[0], max(accepted)[0]
    print(
        f"{'':<14} first request accepted {first - started:.1f}s after launch, the last {last - started:.1f}s",
        flush=True,
    )
    if timeline:
        shares = [0.0] * (int((last - first) // 5) + 1)
        for at, t in accepted:
            shares[int((at - first) // 5)] += t / (rate * 5)
        print(f"{'':<14} share of the token limit used, by 5 s from the first: " + " ".join(f"{s:.0%}" for s in shares))
    return done / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--server-burst", type=float, default=2.0, help="seconds of budget the server's bucket holds")
    parser.add_argument("--parallel", type=int, default=4, help="this project's partitions at once")
    parser.add_argument("--pgai", help="the pgai command of a venv with pgai[vectorizer-worker] installed")
    parser.add_argument("--pgai-concurrency", type=int, help="the worker's -c (default: its own)")
    parser.add_argument("--no-loop", action="store_true", help="skip the plain loop")
    parser.add_argument("--timeline", action="store_true", help="print the share of the limit used every 5 s")
    args = parser.parse_args()

    cluster = OwnedCluster()
    try:
        url = create_database(cluster.url(), extensions=("vector",))
        docs = documents(args.rows)
        for table in ("docs_ours", "docs_pgai", "docs_loop"):
            load(url, table, docs)
        print(
            f"{args.rows:,} documents, {sum(map(len, docs)) / len(docs):,.0f} characters on average; server: "
            f"{RPM:,} RPM, {TPM:,} TPM metered by characters / 4, 150 ms a request, a {args.server_burst:g} s bucket",
            flush=True,
        )
        rates: dict[str, float] = {}
        contenders = [("backfill", "docs_ours", lambda s: ours(url, s, args.rows, args.parallel))]
        if args.pgai:
            contenders.append(("pgai 0.12", "docs_pgai", lambda s: pgai(url, s, args.pgai, args.pgai_concurrency)))
        if not args.no_loop:
            contenders.append(("plain loop", "docs_loop", lambda s: plain_loop(url, s)))
        for name, table, launch in contenders:
            server = FakeProviderServer(limits=limits(args.server_burst)).start()
            try:
                rates[name] = report(
                    name, url, table, server, *launch(server), args.server_burst, timeline=args.timeline
                )
            finally:
                server.stop()
        if "pgai 0.12" in rates:
            print(f"this project / pgai = {rates['backfill'] / rates['pgai 0.12']:.3f} (target >= 1.0)")
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
