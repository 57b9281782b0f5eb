"""Two processes on one partition, and a server that dies mid-write."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml

from backfill_pipeline.config import load_config
from backfill_pipeline.lib import backfill_definitions, job_name

from .conftest import REPO, subprocess_env, write_config
from .graph_helpers import register
from .pg import OwnedCluster, create_database, drop_database
from .test_postgres_scenarios import migrate, posting, sql


def _jobs_table(url: str, rows: int) -> None:
    sql(
        url,
        "CREATE TABLE jobs (id bigint PRIMARY KEY, title text, company text, description text, "
        "embedding vector(768), skills jsonb, seniority text, summary text, content_hash text, "
        "embedding_model text, embedded_at timestamptz, enriched_at timestamptz)",
    )
    with psycopg.connect(url) as conn:
        conn.cursor().executemany(
            "INSERT INTO jobs (id, title, company, description) VALUES (%s, %s, %s, %s)",
            [(i, *posting(i)) for i in range(1, rows + 1)],
        )


def _config(url: str, tmp_path: Path, **extra) -> Path:
    return write_config(
        tmp_path,
        {
            "datasets": {
                "jobs": {
                    "database_url": url,
                    "table": "jobs",
                    "text": {"template": "{title} at {company}\n\n{description}"},
                    "embedding": {"dimension": 768, "batch_size": 64},
                    "enrichment": {"enabled": True, "batch_size": 8},
                    "partitioning": {"width": 100_000},
                    **extra,
                }
            }
        },
    )


def _spawn(dataset: str, key: str, env: dict[str, str], start_at: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "backfill_pipeline_tests.run_partition_script", dataset, key, str(start_at)],
        cwd=REPO,
        env=subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _outcome(proc: subprocess.Popen, timeout: float = 240) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert out.strip(), err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def shared_home(tmp_path: Path, pg_server_url: str):
    """A Dagster instance on Postgres that both processes share, so each sees the other's run."""
    url = create_database(pg_server_url)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    yield {"DAGSTER_HOME": str(home), "DAGSTER_POSTGRES_URL": url.replace("postgresql", "postgresql+psycopg2", 1)}
    drop_database(pg_server_url, url)


def test_two_processes_on_one_partition_pay_once(pgvector_db: str, tmp_path: Path, shared_home, monkeypatch) -> None:
    _jobs_table(pgvector_db, 1500)
    path = _config(pgvector_db, tmp_path)
    config = load_config(path)
    migrate(config)
    env = {**shared_home, "BACKFILL_CONFIG": str(path)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    instance = dg.DagsterInstance.get()
    key = register(config, "jobs", instance)[0]

    start_at = time.time() + 8  # both processes import Dagster first, then start within a few ms
    procs = [_spawn("jobs", key, env, start_at) for _ in range(2)]
    outcomes = [_outcome(p) for p in procs]
    assert all(o["success"] for o in outcomes), outcomes

    embedded = sum(o["assets"]["embeddings"].get("provider_inputs", 0) for o in outcomes)
    enriched = sum(o["assets"]["llm_enrichment"].get("provider_inputs", 0) for o in outcomes)
    written = sum(o["assets"]["written_table"]["rows_written"] for o in outcomes)
    assert (embedded, enriched, written) == (1500, 1500, 1500), json.dumps(outcomes)[:3000]
    skipped = [o for o in outcomes if "held_by_run" in o["assets"]["raw_rows"]]
    winner = [o for o in outcomes if "held_by_run" not in o["assets"]["raw_rows"]]
    assert len(skipped) == 1 and len(winner) == 1, "the runs were meant to overlap"
    assert skipped[0]["assets"]["raw_rows"]["held_by_run"] == winner[0]["run_id"]
    assert "being processed by run" in skipped[0]["assets"]["raw_rows"]["skipped"]
    assert (
        sql(pgvector_db, "SELECT count(*) FROM jobs WHERE embedding IS NOT NULL AND summary IS NOT NULL")[0][0] == 1500
    )


def test_server_stopped_mid_write_then_retry_completes(tmp_path: Path, monkeypatch) -> None:
    cluster = OwnedCluster()  # this test owns the server it stops
    try:
        url = create_database(cluster.url(), extensions=("vector",))
        _jobs_table(url, 400)
        # every write statement takes 40 ms, so the test can stop the server between batches
        sql(
            url,
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(0.04); RETURN NULL; END $$",
        )
        sql(url, "CREATE TRIGGER slow_writes AFTER UPDATE ON jobs FOR EACH STATEMENT EXECUTE FUNCTION slow()")
        path = _config(url, tmp_path, write_batch_size=10, retry={"max_retries": 0})
        config = load_config(path)
        migrate(config)
        home = tmp_path / "home"
        home.mkdir()
        env = {"DAGSTER_HOME": str(home), "BACKFILL_CONFIG": str(path)}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        instance = dg.DagsterInstance.get()
        key = register(config, "jobs", instance)[0]

        proc = _spawn("jobs", key, env)
        deadline = time.time() + 120
        written = 0
        while time.time() < deadline:
            written = sql(url, "SELECT count(*) FROM jobs WHERE embedding IS NOT NULL")[0][0]
            if written >= 50:
                break
            time.sleep(0.01)
        assert 50 <= written < 400, "the write phase was not caught in the middle"
        cluster.stop("immediate")
        outcome = _outcome(proc)
        assert not outcome["success"]
        message = " ".join(outcome["errors"])
        assert "lost the database connection while writing batch" in message, message
        assert "Re-run the partition" in message

        cluster.start()
        counts = sql(
            url,
            """SELECT count(*) FILTER (WHERE embedding IS NOT NULL),
            count(*) FILTER (WHERE embedding IS NOT NULL AND content_hash IS NOT NULL AND embedding_model IS NOT NULL
                             AND summary IS NOT NULL AND skills IS NOT NULL AND embedded_at IS NOT NULL),
            count(*) FILTER (WHERE embedding IS NULL AND content_hash IS NULL AND summary IS NULL) FROM jobs""",
        )[0]
        assert counts[0] == counts[1]  # no row is partly written
        assert counts[0] % 10 == 0 and counts[0] + counts[2] == 400  # whole batches only

        retry = _outcome(_spawn("jobs", key, env))
        assert retry["success"], retry["errors"]
        assert retry["assets"]["written_table"]["rows_written"] == 400 - counts[0]
        assert retry["assets"]["embeddings"]["provider_inputs"] == 400 - counts[0]  # only what was missing
        assert sql(url, "SELECT count(*) FROM jobs WHERE embedding IS NOT NULL AND summary IS NOT NULL")[0][0] == 400
    finally:
        cluster.destroy()


def test_production_yaml_is_valid_yaml() -> None:
    assert yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())["storage"]["postgres"]["postgres_url"]["env"]


def test_a_lock_held_elsewhere_times_the_write_out_then_the_retry_completes(
    pgvector_db: str, tmp_path: Path, instance
) -> None:
    """Another session holds row locks in the partition: the write waits lock_timeout_seconds, not for ever,
    fails naming the batch, and a run after the lock is gone writes everything (paid work from the cache)."""
    _jobs_table(pgvector_db, 120)
    retry = {"max_retries": 3, "delay_seconds": 0.1}
    config = load_config(_config(pgvector_db, tmp_path, lock_timeout_seconds=1, write_batch_size=50, retry=retry))
    migrate(config)
    key = register(config, "jobs", instance)[0]
    job = backfill_definitions(config).resolve_job_def(job_name("jobs"))
    blocker = psycopg.connect(pgvector_db)  # a transaction left open, as a stuck session would
    try:
        blocker.execute("SELECT id FROM jobs WHERE id BETWEEN 60 AND 70 FOR UPDATE")
        started = time.monotonic()
        failed = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False)
        assert not failed.success and time.monotonic() - started < 60
        failure = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
        retried = [e for e in failed.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
        assert len(retried) == 3  # the dataset's retry policy took it (retry: max_retries 3)
        error, message = failure.event_specific_data.error, ""
        while error is not None:
            message, error = message + error.message, error.cause
        assert "timed out" in message and "lock_timeout_seconds 1" in message and "batch 2 of 3" in message, message
    finally:
        blocker.close()
    done = job.execute_in_process(partition_key=key, instance=instance)
    assert done.success
    assert sql(pgvector_db, "SELECT count(*) FROM jobs WHERE embedding IS NOT NULL")[0][0] == 120


def test_paid_answers_and_failures_are_kept_across_a_database_restart(tmp_path: Path, monkeypatch) -> None:
    """A restart drops the step's connections while it is paying: what it pays for afterwards is kept at
    the first try (cache and failures on a new connection), and a put that meets the server away waits for it."""
    import asyncio
    import threading

    from backfill_pipeline.cache import StoreCache, keep_paid
    from backfill_pipeline.stores import Failure, open_store

    cluster = OwnedCluster()  # this test owns the server it restarts
    try:
        url = create_database(cluster.url(), extensions=("vector",))
        _jobs_table(url, 1)
        monkeypatch.setenv("RESTART_DATABASE_URL", url)
        config = load_config(_config({"env": "RESTART_DATABASE_URL"}, tmp_path))  # type: ignore[arg-type]
        migrate(config)
        with open_store("jobs", config.datasets["jobs"]) as store:
            cache = StoreCache(store.ledger, ttl_days=30)
            asyncio.run(cache.put_many({"before": b"1"}))
            store.ledger.record_failures([Failure(1, "enrichment", "invalid_output", "before")])

            cluster.stop("fast")  # both connections of the store die with the server
            cluster.start()
            store.ledger.record_failures([Failure(2, "enrichment", "invalid_output", "paid, unusable")])
            asyncio.run(cache.put_many({"after": b"2"}))
            assert asyncio.run(cache.get_many(["before", "after"])) == {"before": b"1", "after": b"2"}

            cluster.stop("fast")
            threading.Timer(1.5, cluster.start).start()  # back while the put below waits
            started = time.monotonic()
            asyncio.run(keep_paid(cache, {"while away": b"3"}))
            assert time.monotonic() - started >= 1.0  # it did meet the server away
            assert asyncio.run(cache.get_many(["while away"])) == {"while away": b"3"}
        failed = sql(url, "SELECT row_id, message, attempts FROM backfill_failures ORDER BY row_id")
        assert failed == [("1", "before", 1), ("2", "paid, unusable", 1)]
    finally:
        cluster.destroy()


def test_keep_paid_gives_up_at_once_on_an_error_a_wait_cannot_mend() -> None:
    import asyncio

    from backfill_pipeline.cache import NullCache, keep_paid

    class Refusing(NullCache):
        calls = 0

        async def put_many(self, items: dict[str, bytes]) -> None:
            self.calls += 1
            raise psycopg.errors.InsufficientPrivilege("permission denied for table backfill_cache")

    cache = Refusing()
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        asyncio.run(keep_paid(cache, {"k": b"v"}, waits=(5.0,)))
    assert cache.calls == 1


def test_keep_paid_waits_for_a_redis_that_is_away_then_says_so() -> None:
    """Nothing listens on the port: each put is refused a connection, which a restart would mend, so the
    answers are offered again after each wait; the last refusal is raised, not swallowed."""
    import asyncio

    import redis

    from backfill_pipeline.cache import RedisCache, keep_paid

    cache = RedisCache("redis://127.0.0.1:9/15", ttl_days=1)
    calls = 0
    put = cache.put_many

    async def counted(items: dict[str, bytes]) -> None:
        nonlocal calls
        calls += 1
        await put(items)

    cache.put_many = counted  # type: ignore[method-assign]
    with pytest.raises(redis.exceptions.ConnectionError):
        asyncio.run(keep_paid(cache, {"k": b"v"}, waits=(0.05, 0.05)))
    assert calls == 3
