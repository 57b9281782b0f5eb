"""Soak: a partition set run through provider faults, a Postgres restart, bad rows and SIGKILLs at random
points, re-run after each with no manual step, then checked row by row.

Real processes: `backfill-pipeline materialize --parallel 2` against the loopback provider server and a
Postgres 16 of the test's own (so it can be restarted); the paid-results cache and the rate budget on
Redis under a key prefix of the test's own. The figures are printed (`pytest -s -m soak`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from .conftest import subprocess_env, write_config
from .fake_providers import OPENAI_KEY, FakeProviderServer, Fault, ModelLimits
from .pg import OwnedCluster, create_database, unavailable

pytestmark = pytest.mark.soak

ROWS, WIDTH, KILLS = 2000, 200, 6
WORKERS, CHAT_IN_FLIGHT, EMBEDDING_IN_FLIGHT, EMBEDDING_BATCH = 2, 4, 8, 50
DB_PASSWORD = "soak-db-password-31337"
REDIS = "redis://127.0.0.1:6379/0"
CLI = str(Path(sys.executable).parent / "backfill-pipeline")
BAD_STORED = ['"a string"', '{"an": "object"}', "[[1, 2], [3, 4]]", "[1, null, 2]", '["NaN"]']
PERMANENT = ("FAULT:schema", "FAULT:badjson", "FAULT:400")


def _row(i: int) -> tuple[int, str | None, str | None]:
    """Postings with shared texts across partitions, rows without text, and rows that make the provider
    answer badly (recorded failures) or with a NUL (cleaned)."""
    if i % 50 == 1:
        return i, None, ""
    title = ["Data Engineer", "Senior Python Developer", "Nurse", "Backend Go Engineer"][i % 4]
    if i % 10 == 3:
        return i, title, f"Shared posting {i % 40}: build pipelines in Python and SQL."
    markers = {97: "FAULT:schema", 89: "FAULT:400", 83: "FAULT:nul", 79: "FAULT:badjson"}
    marker = next((m for k, m in markers.items() if i % k == 0), "")
    return i, title, f"Posting {i}: {title} working with Python, SQL and Kubernetes. {marker}".strip()


def _table(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE postings (id bigint PRIMARY KEY, title text, description text, embedding jsonb)")
        conn.cursor().executemany(
            "INSERT INTO postings (id, title, description) VALUES (%s, %s, %s)", [_row(i) for i in range(1, ROWS + 1)]
        )
        for n, value in enumerate(BAD_STORED):
            conn.execute("UPDATE postings SET embedding = %s::jsonb WHERE id = %s", [value, 20 + n])


def _writes_log(url: str) -> None:
    """Every write of an embedding, by row and content hash: a row written twice for one content shows."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE writes (id bigint, content_hash text)")
        conn.execute(
            "CREATE FUNCTION log_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "INSERT INTO writes VALUES (NEW.id, NEW.content_hash); RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER log_write AFTER UPDATE ON postings FOR EACH ROW "
            "WHEN (NEW.embedded_at IS DISTINCT FROM OLD.embedded_at AND NEW.embedding IS NOT NULL) "
            "EXECUTE FUNCTION log_write()"
        )


def _config(tmp_path: Path, server: FakeProviderServer, prefix: str) -> Path:
    openai = {
        "provider": "openai",
        "base_url": server.openai_url,
        "timeout_seconds": 6,  # a busy 2-core machine must not time out (and so pay twice for) normal answers
        "retry": {"rate_limit_base_seconds": 0.2, "transient_base_seconds": 0.1, "max_attempts": 4},
    }
    jobs = {
        "database_url": {"env": "SOAK_DATABASE_URL"},
        "table": "postings",
        "text": {"columns": ["title", "description"]},
        "embedding": {
            **openai,
            "model": "text-embedding-3-small",
            "dimension": 768,
            "batch_size": EMBEDDING_BATCH,
            "max_in_flight": EMBEDDING_IN_FLIGHT,
        },
        "enrichment": {**openai, "enabled": True, "model": "gpt-4o-mini", "max_in_flight": CHAT_IN_FLIGHT},
        "partitioning": {"width": WIDTH},
        "lease_seconds": 5,
        "retry": {"max_retries": 3, "delay_seconds": 0.5},
        "cache": {"backend": "redis", "redis_url": REDIS, "key_prefix": prefix, "claim_seconds": 5},
        "rate_limiter": {"backend": "redis", "redis_url": REDIS},
    }
    return write_config(tmp_path, {"datasets": {"jobs": jobs}})


def _redis_or_skip():
    import redis

    client = redis.Redis.from_url(REDIS)
    try:
        client.ping()
    except redis.ConnectionError:
        unavailable("no Redis on 127.0.0.1:6379")
    return client


def test_soak(tmp_path: Path) -> None:
    client = _redis_or_skip()
    seed = int(os.environ.get("SOAK_SEED", time.time()))
    rng = random.Random(seed)
    print(f"soak seed {seed} (SOAK_SEED={seed} repeats this run)")  # first: a failing run names its seed
    cluster = OwnedCluster()
    server = FakeProviderServer().start()
    server.limits["gpt-4o-mini"] = ModelLimits(latency_seconds=0.1)
    prefix = f"backfill-soak-{uuid.uuid4().hex}:"
    outputs: list[str] = []
    try:
        url = create_database(cluster.url()).replace("postgres@", f"postgres:{DB_PASSWORD}@", 1)
        _table(url)
        home = tmp_path / "home"
        home.mkdir()
        env = subprocess_env(
            BACKFILL_CONFIG=str(_config(tmp_path, server, prefix)),
            SOAK_DATABASE_URL=url,
            DAGSTER_HOME=str(home),
            OPENAI_API_KEY=OPENAI_KEY,
        )

        def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
            done = subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)
            outputs.append(done.stdout + done.stderr)
            return done

        assert cli("migrate").returncode == 0 and cli("register").returncode == 0
        _writes_log(url)

        def restart_postgres() -> None:
            cluster.stop("fast")
            time.sleep(1.0)
            cluster.start()

        faults: list[Callable[[], object]] = [
            lambda: server.inject("chat", Fault("429", times=40, retry_after=0.3)),
            lambda: (server.inject("chat", Fault("500", times=6)), server.inject("embeddings", Fault("503", times=4))),
            lambda: (
                server.inject("chat", Fault("timeout", times=2, retry_after=7)),
                server.inject("embeddings", Fault("truncated", times=3)),
            ),
            lambda: server.refuse_connections(2.0),
            restart_postgres,
            lambda: server.inject("embeddings", Fault("429", times=10, retry_after=0.5)),
        ]
        kills = in_flight_at_kills = 0
        rounds: list[str] = []
        for round_ in range(KILLS):
            started_at = server.answered_texts()
            proc = subprocess.Popen(
                [CLI, "materialize", "--yes", "--parallel", str(WORKERS)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            # faults and the kill land while the run is paying: after a random number of answers
            deadline, wanted = time.time() + 90, started_at + rng.randint(5, 60)
            while server.answered_texts() < wanted and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            faults[round_ % len(faults)]()
            time.sleep(rng.uniform(0.2, 3.0))
            if proc.poll() is None:
                answered = server.answered_texts()
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
                outputs.append(proc.communicate(timeout=600)[0])
                # everything the server answers from now on was sent before the kill: in flight at it
                deadline = time.time() + 10
                while server.in_flight() and time.time() < deadline:
                    time.sleep(0.05)
                time.sleep(0.5)
                in_flight_at_kills += server.answered_texts() - answered
            else:
                outputs.append(proc.communicate(timeout=600)[0])
            repeated = server.repeated_texts("chat") + server.repeated_texts("embeddings")
            rounds.append(
                f"round {round_}: kills {kills}, paid twice {repeated}, in flight at kills {in_flight_at_kills}"
            )

        # Re-run until done, as an operator would; transient failures left by the faults are re-queued.
        time.sleep(5.5)  # the claims of the last killed run lapse
        for _ in range(3):
            if cli("materialize", "--yes", "--parallel", "2").returncode == 0:
                break
        with psycopg.connect(url, autocommit=True) as conn:
            transient = [
                r
                for (r,) in conn.execute(
                    "SELECT row_id FROM backfill_failures WHERE error_class NOT IN ('invalid_output', 'permanent')"
                )
            ]
        if transient:
            assert cli("requeue", "--ids", *transient).returncode == 0
        final = cli("materialize", "--yes", "--parallel", "2")
        assert final.returncode == 0, final.stdout + final.stderr[-3000:]
        partitions = ROWS // WIDTH + 1  # ids 1..ROWS in ranges of WIDTH from 0
        assert final.stdout.count(": ok,") == partitions  # no partition stuck or skipped

        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT id, title, description, embedding, summary, content_hash FROM postings"
            ).fetchall()
            failed = {
                int(r): (stage, cls)
                for r, stage, cls in conn.execute("SELECT row_id, stage, error_class FROM backfill_failures")
            }
            twice = conn.execute(
                "SELECT count(*) FROM (SELECT id FROM writes GROUP BY id, content_hash HAVING count(*) > 1) w"
            ).fetchone()[0]
            leases = conn.execute("SELECT count(*) FROM backfill_leases").fetchone()[0]
    finally:
        server.stop()
        cluster.destroy()
        made = client.keys(f"{prefix}*")
        if made:
            client.delete(*made)

    print("\n" + "\n".join(rounds))
    print("paid twice:", "\n  ".join(server.repeated_samples()[:12]))
    with_text = [r for r in rows if (r[1] or "").strip() or (r[2] or "").strip()]
    valid = [
        r
        for r in with_text
        if isinstance(r[3], list) and len(r[3]) == 768 and all(isinstance(x, float | int) for x in r[3]) and r[4]
    ]
    expected_failures = {r[0] for r in with_text if any(m in (r[2] or "") for m in PERMANENT)}
    lost = [r[0] for r in with_text if r not in valid and r[0] not in failed]
    assert not lost, f"rows with text but neither a valid result nor a recorded failure: {lost[:10]}"
    assert set(failed) == expected_failures, "every recorded failure is a row the provider answers badly"
    assert all("\x00" not in (r[4] or "") for r in rows)
    assert twice == 0 and leases == 0
    paid_twice = server.repeated_texts("chat") + server.repeated_texts("embeddings")
    assert kills >= 5
    # Requests in flight at a kill: at most each paying process's max_in_flight requests per stage (chat: one
    # text each; embeddings: a batch each); the processes are the workers and the CLI's head start, whose
    # last requests may still be in flight as the first run's step begins. The server sees some of them
    # answered after the kill (counted in `in_flight_at_kills`); the others were answered just before it,
    # their answers not yet kept.
    payers = WORKERS + 1
    chat_bound = kills * payers * CHAT_IN_FLIGHT
    embedding_bound = kills * payers * EMBEDDING_IN_FLIGHT * EMBEDDING_BATCH
    assert server.repeated_texts("chat") <= chat_bound, (rounds, server.repeated_samples()[:5])
    assert server.repeated_texts("embeddings") <= embedding_bound, (rounds, server.repeated_samples()[:5])
    for text in outputs:
        assert OPENAI_KEY not in text and DB_PASSWORD not in text
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert OPENAI_KEY.encode() not in data and DB_PASSWORD.encode() not in data, path
    print(
        "\nsoak: "
        + json.dumps(
            {
                "seed": seed,
                "rows": ROWS,
                "rows_with_text": len(with_text),
                "kills": kills,
                "rows_valid": len(valid),
                "rows_failed_recorded": len(failed),
                "rows_lost": len(lost),
                "rows_written_twice": twice,
                "texts_paid_twice": paid_twice,
                "texts_answered_after_the_kills": in_flight_at_kills,
                "in_flight_capacity_at_the_kills": {"chat": chat_bound, "embeddings": embedding_bound},
                "partitions_stuck": partitions - final.stdout.count(": ok,"),
                "requests": {f"{route} {status}": n for (route, status), n in sorted(server.stats.statuses.items())},
            }
        )
    )
