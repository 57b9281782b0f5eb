"""Provider throughput benchmark: enrichment + embeddings of 10,000 job postings at tier-like limits.

A loopback server speaks the OpenAI wire format with tier-like limits per model (chat model: 5,000 RPM,
4,000,000 TPM, 400 ms per request; embedding model: 5,000 RPM, 5,000,000 TPM, 150 ms per request). The
pipeline is launched the way a user would: ``backfill-pipeline register`` then
``backfill-pipeline materialize --parallel N`` over every partition, into Postgres.

It prints:
- the ceiling those limits allow for the tokens actually sent (per model: max(requests / RPM,
  tokens / TPM) minutes less the server's 2 s bucket, which a full bucket admits at once; tokens metered
  by the server as OpenAI does, characters / 4; the slowest model bounds the whole run, since stages and
  partitions overlap),
  the rate reached, and the share of requests answered 429;
- a baseline written like the seeds (one row at a time: one enrichment call, one embedding call, one
  UPDATE, no sleep) on the first 100 rows, same server, same run, and the speed-up over it;
- the texts paid for twice after a clean run followed by a second run.

usage: python bench/providers.py [--rows 10000] [--width 500] [--parallel 6]
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

from backfill_pipeline.demo_data import _posting  # noqa: E402
from backfill_pipeline.providers.openai_provider import SYSTEM_PROMPT  # noqa: E402
from backfill_pipeline_tests.fake_providers import OPENAI_KEY, FakeProviderServer, ModelLimits  # noqa: E402
from backfill_pipeline_tests.pg import OwnedCluster, create_database  # noqa: E402

CHAT, EMBED = "gpt-4o-mini", "text-embedding-3-small"
LIMITS = {  # metered as OpenAI does (characters / 4), in buckets of 2 s of budget (the server's default)
    CHAT: ModelLimits(requests_per_minute=5000, tokens_per_minute=4_000_000, latency_seconds=0.4, meter="characters"),
    EMBED: ModelLimits(requests_per_minute=5000, tokens_per_minute=5_000_000, latency_seconds=0.15, meter="characters"),
}
SKILLSPAN = ROOT.parent / "shared" / "data" / "skillspan" / "postings.jsonl"


def postings(n: int) -> list[tuple[str, str, str]]:
    """~1,500-character postings: real SkillSpan texts where ../shared is present, generated ones otherwise."""
    import random

    rng = random.Random(5)
    sources: list[str] = []
    if SKILLSPAN.exists():
        for line in SKILLSPAN.open():
            text = json.loads(line)["text"]
            sources += [text[i : i + 1500] for i in range(0, max(len(text) - 1500, 1), 1500)]
    rows = []
    for i in range(n):
        p = _posting(rng)
        body = sources[i % len(sources)] if sources else (p["description"] + "\n\n") * 2
        body = re.sub(r"\s+\S*$", "", body[:1460])
        rows.append((p["title"], p["company"], f"{body}\n\nReference {i}."))
    return rows


def load(url: str, rows: list[tuple[str, str, str]]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("jobs", "jobs_baseline"):
            conn.execute(
                f"CREATE TABLE {table} (id bigint PRIMARY KEY, title text, company text, description text, "
                "embedding vector(768), skills jsonb, seniority text, summary text, content_hash text, "
                "embedding_model text, embedded_at timestamptz, enriched_at timestamptz)"
            )
        with conn.cursor() as cur, cur.copy("COPY jobs (id, title, company, description) FROM STDIN") as copy:
            for i, row in enumerate(rows, 1):
                copy.write_row((i, *row))
        conn.execute("INSERT INTO jobs_baseline SELECT * FROM jobs WHERE id <= 100")


def baseline(server: FakeProviderServer, url: str) -> float:
    """The seeds' way: per row one chat call, one embedding call, one UPDATE, nothing in parallel."""
    client = OpenAI(api_key=OPENAI_KEY, base_url=server.openai_url, max_retries=3)
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id, title, company, description FROM jobs_baseline ORDER BY id").fetchall()
        started = time.perf_counter()
        for row_id, title, company, description in rows:
            text = f"{title} at {company}\n\n{description}"
            chat = client.chat.completions.create(
                model=CHAT,
                messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}],
                response_format={"type": "json_object"},
            )
            answer = json.loads(chat.choices[0].message.content)
            vector = client.embeddings.create(model=EMBED, input=text, dimensions=768).data[0].embedding
            conn.execute(
                "UPDATE jobs_baseline SET embedding = %s::vector, skills = %s, seniority = %s, summary = %s "
                "WHERE id = %s",
                [str(list(vector)), json.dumps(answer["skills"]), answer["seniority"], answer["summary"], row_id],
            )
            conn.commit()
        return len(rows) / (time.perf_counter() - started)


def config(url: str, server: FakeProviderServer, width: int) -> dict:
    return {
        "datasets": {
            "jobs": {
                "database_url": url,
                "table": "jobs",
                "text": {"template": "{title} at {company}\n\n{description}"},
                "partitioning": {"width": width},
                "embedding": {
                    "provider": "openai",
                    "model": EMBED,
                    "dimension": 768,
                    "base_url": server.openai_url,
                    "batch_size": 256,
                    "max_in_flight": 8,
                    "rate_limit": {"requests_per_minute": 5000, "tokens_per_minute": 5_000_000},
                    "price_per_million_input_tokens": 0.02,
                },
                "enrichment": {
                    "enabled": True,
                    "provider": "openai",
                    "model": CHAT,
                    "base_url": server.openai_url,
                    "max_in_flight": 64,
                    "expected_output_tokens": 120,
                    "rate_limit": {"requests_per_minute": 5000, "tokens_per_minute": 4_000_000},
                    "price_per_million_input_tokens": 0.15,
                    "price_per_million_output_tokens": 0.6,
                },
            }
        }
    }


def server_totals(server: FakeProviderServer, since: float) -> dict[str, tuple[int, int]]:
    totals: dict[str, tuple[int, int]] = {}
    for at, _route, model, tokens in server.stats.accepted_at:
        if at >= since:
            requests, used = totals.get(model, (0, 0))
            totals[model] = (requests + 1, used + tokens)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--width", type=int, default=500, help="ids per partition")
    parser.add_argument("--parallel", type=int, default=6, help="partitions running at once")
    parser.add_argument("--timeline", action="store_true", help="print each model's share of its limit every 5 s")
    args = parser.parse_args()

    server = FakeProviderServer(limits=LIMITS).start()
    cluster = OwnedCluster()
    work = Path(tempfile.mkdtemp(prefix="bench-providers-"))
    try:
        url = create_database(cluster.url(), extensions=("vector",))
        rows = postings(args.rows)
        load(url, rows)
        mean_chars = sum(len(f"{t} at {c}\n\n{d}") for t, c, d in rows) / len(rows)
        print(
            f"{len(rows):,} postings, {mean_chars:,.0f} characters on average "
            f"({'SkillSpan text' if SKILLSPAN.exists() else 'generated text'}), Postgres 16 + pgvector"
        )

        base_rate = baseline(server, url)
        print(
            f"baseline like the seeds (first 100 rows; per row one chat call, one embedding call, one UPDATE): "
            f"{base_rate:.2f} rows/s"
        )

        (work / "home").mkdir()
        (work / "backfill.yaml").write_text(yaml.safe_dump(config(url, server, args.width)))
        env = {
            **os.environ,
            "BACKFILL_CONFIG": str(work / "backfill.yaml"),
            "DAGSTER_HOME": str(work / "home"),
            "OPENAI_API_KEY": OPENAI_KEY,
        }
        cli = [str(Path(sys.executable).parent / "backfill-pipeline")]
        subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True)
        subprocess.run([*cli, "register"], env=env, check=True, capture_output=True)

        statuses_before = dict(server.stats.statuses)
        launched = time.time()
        done = subprocess.run(
            [*cli, "materialize", "--parallel", str(args.parallel)], env=env, capture_output=True, text=True
        )
        seconds = time.time() - launched
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:])
            raise SystemExit("the backfill failed")
        with psycopg.connect(url) as conn:
            complete = conn.execute(
                "SELECT count(*) FROM jobs WHERE embedding IS NOT NULL AND summary IS NOT NULL AND skills IS NOT NULL"
            ).fetchone()[0]
        totals = server_totals(server, launched)
        print(
            f"\nbackfill: `backfill-pipeline materialize --parallel {args.parallel}` over "
            f"{args.rows // args.width} partitions of {args.width} ids: {complete:,}/{args.rows:,} rows complete "
            f"in {seconds:.1f}s = {args.rows / seconds:.1f} rows/s"
        )
        bound = 0.0
        for model, (requests, tokens) in sorted(totals.items()):
            limits = LIMITS[model]
            assert limits.requests_per_minute and limits.tokens_per_minute
            held = limits.burst_seconds / 60  # the server's full bucket admits this much of a minute at once
            minutes = max(requests / limits.requests_per_minute - held, tokens / limits.tokens_per_minute - held, 0.0)
            bound = max(bound, minutes)
            print(
                f"  {model}: {requests:,} requests, {tokens:,} tokens metered -> at least {minutes * 60:.1f}s at "
                f"{limits.requests_per_minute:,.0f} RPM / {limits.tokens_per_minute:,.0f} TPM "
                f"(max(requests/RPM, tokens/TPM) less the {limits.burst_seconds:g} s bucket)"
            )
        ceiling = args.rows / (bound * 60)
        print(
            f"  ceiling: the slowest model bounds the run at {bound * 60:.1f}s = {ceiling:.1f} rows/s; "
            f"reached {args.rows / seconds:.1f} rows/s = {args.rows / seconds / ceiling:.1%} of the ceiling"
        )
        chat_times = [at for at, route, _, _ in server.stats.accepted_at if at >= launched and route == "chat"]
        print(
            f"  timeline: first chat request {min(chat_times) - launched:.1f}s after launch (start-up), last "
            f"{max(chat_times) - launched:.1f}s; the run ended at {seconds:.1f}s"
        )
        if args.timeline:
            for route, model in (("chat", CHAT), ("embeddings", EMBED)):
                rate = (LIMITS[model].tokens_per_minute or 0) / 60
                shares = [0.0] * (int(seconds // 5) + 1)
                for at, r, _, t in server.stats.accepted_at:
                    if r == route and at >= launched:
                        shares[min(int((at - launched) // 5), len(shares) - 1)] += t / (rate * 5)
                print(f"  {route} share of its token limit by 5 s from launch: " + " ".join(f"{x:.0%}" for x in shares))
            print("  " + "\n  ".join(line for line in done.stdout.splitlines() if "] " in line))
        new = {k: v - statuses_before.get(k, 0) for k, v in server.stats.statuses.items()}
        total = sum(n for (route, _), n in new.items() if route in ("chat", "embeddings"))
        limited = sum(n for (route, status), n in new.items() if status == 429)
        print(f"  requests answered 429: {limited} of {total} = {limited / max(total, 1):.2%}")
        print(f"  speed-up over the seeds' baseline: {args.rows / seconds / base_rate:.0f}x")

        again = subprocess.run(
            [*cli, "materialize", "--parallel", str(args.parallel)], env=env, capture_output=True, text=True
        )
        assert again.returncode == 0, again.stderr[-2000:]
        repeated = sum(server.repeated_texts(route) for route in ("chat", "embeddings"))
        baseline_texts = 2 * 100  # the baseline's own rows were sent once by it and once by the backfill
        print(
            f"\nsecond run after the clean one: texts paid for twice = {repeated - baseline_texts} "
            f"(server's count, less the baseline's 100 rows x 2 calls that the backfill also sent)"
        )
    finally:
        server.stop()
        cluster.destroy()


if __name__ == "__main__":
    main()
