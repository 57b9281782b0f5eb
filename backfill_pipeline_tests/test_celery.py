"""Past one machine, end to end: two dagster-celery workers, each in its own working directory with its own
temporary storage, execute the steps of a partition backfill launched as the UI launches it.

Dagster's storage is Postgres; the Celery broker and backend are the local Redis, on a database number
this test finds empty and empties again; the intermediates go through moto's S3 server; the providers are
the loopback server, enforcing a requests-per-minute limit the config also gives, so its 429 count shows
whether the budget shared through the target database held across both workers. Only configuration
chooses the executor and the intermediates (no wrapper module)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import psycopg
import pytest
import yaml

from .conftest import REPO, subprocess_env, write_config
from .fake_providers import OPENAI_KEY, FakeProviderServer, ModelLimits
from .pg import unavailable
from .test_object_store import BUCKET, _keys
from .test_object_store import s3 as s3  # noqa: F401 - the S3 stand-in fixture
from .test_postgres_scenarios import posting, sql
from .test_production_backfill import BIN, _backfill_status, _launch, _services

ROWS, WIDTH = 200, 50


@pytest.fixture
def celery_redis():
    """A Redis database number nobody uses (empty, then marked ours), emptied afterwards."""
    redis = pytest.importorskip("redis")
    for db in range(15, 0, -1):
        client = redis.Redis(host="127.0.0.1", port=6379, db=db)
        try:
            if client.dbsize() == 0 and client.set("backfill-test:celery-owner", os.getpid(), nx=True):
                break
        except redis.ConnectionError:
            unavailable("no Redis on 127.0.0.1:6379")
    else:
        pytest.fail("no empty Redis database number for the Celery broker")
    yield f"redis://127.0.0.1:6379/{db}"
    client.flushdb()


def _worker(name: str, tmp_path: Path, env: dict, worker_config: Path) -> tuple[subprocess.Popen, Path]:
    """One worker with its own working directory and temporary storage (nothing shared on disk)."""
    home = tmp_path / name
    (home / "tmp").mkdir(parents=True)
    log = home / "worker.log"
    proc = subprocess.Popen(
        [
            str(BIN / "dagster-celery"),
            "worker",
            "start",
            "-A",
            "dagster_celery.app",
            "-y",
            str(worker_config),
            "-n",
            f"{name}@%h",
            "--",
            "--concurrency=1",
        ],
        cwd=home,
        env={**env, "TMPDIR": str(home / "tmp"), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, log


def test_two_celery_workers_run_a_partition_backfill_through_s3(
    production,
    tmp_path: Path,
    celery_redis: str,
    s3,  # noqa: F811
    server: FakeProviderServer,  # noqa: F811
) -> None:
    home, dagster_db, data_db = production
    sql(
        data_db,
        "CREATE TABLE jobs_enriched (id bigint PRIMARY KEY, title text, company text, description text, "
        "embedding jsonb)",
    )
    with psycopg.connect(data_db) as conn:
        conn.cursor().executemany(
            "INSERT INTO jobs_enriched (id, title, company, description) VALUES (%s,%s,%s,%s)",
            [(i, *posting(i)) for i in range(ROWS)],  # ids 0..199: four partitions
        )
    server.limits["text-embedding-3-small"] = ModelLimits(requests_per_minute=600, burst_seconds=1.0)
    server.limits["gpt-4o-mini"] = ModelLimits(requests_per_minute=600, burst_seconds=1.0)
    fast = {"rate_limit_base_seconds": 0.2, "transient_base_seconds": 0.1, "max_attempts": 8}
    openai = {
        "provider": "openai",
        "base_url": server.openai_url,
        "retry": fast,
        "rate_limit": {"requests_per_minute": 600},
    }
    jobs = {
        "database_url": {"env": "JOBS_DATABASE_URL"},
        "table": "jobs_enriched",
        "text": {"template": "{title} at {company}\n\n{description}"},
        "embedding": {**openai, "model": "text-embedding-3-small", "dimension": 256, "batch_size": 8},
        "enrichment": {**openai, "enabled": True, "model": "gpt-4o-mini"},
        "partitioning": {"width": WIDTH},
        "rate_limiter": {"backend": "database", "burst_seconds": 0.5},
    }
    broker = {"broker": {"env": "CELERY_BROKER_URL"}, "backend": {"env": "CELERY_BROKER_URL"}}
    execution = {
        "executor": "dagster_celery:celery_executor",
        "executor_config": broker,
        "intermediates": f"s3://{BUCKET}/runs",
    }
    config = write_config(tmp_path, {"execution": execution, "datasets": {"jobs": jobs}})
    env = subprocess_env(
        BACKFILL_CONFIG=str(config),
        JOBS_DATABASE_URL=data_db,
        DAGSTER_HOME=str(home),
        DAGSTER_POSTGRES_URL=dagster_db.replace("postgresql", "postgresql+psycopg2", 1),
        OPENAI_API_KEY=OPENAI_KEY,
        CELERY_BROKER_URL=celery_redis,
        **{
            k: os.environ[k]
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
        },
    )
    for args in (["migrate"], ["register"], ["pools", "--embedding", "4", "--llm", "4"]):
        done = subprocess.run(
            [str(BIN / "backfill-pipeline"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
    keys = [f"{start:010d}-{start + WIDTH - 1:010d}" for start in range(0, ROWS, WIDTH)]

    worker_config = tmp_path / "celery.yaml"
    worker_config.write_text(
        yaml.safe_dump({"execution": {"config": {"broker": celery_redis, "backend": celery_redis}}})
    )
    workers = [_worker(name, tmp_path, env, worker_config) for name in ("w1", "w2")]
    try:
        with _services(env, tmp_path) as (port, logs):
            launched = _launch(port, keys)
            for proc, log in workers:
                assert proc.poll() is None, log.read_text()[-3000:]
            status = _backfill_status(port, launched["backfillId"], timeout=300)
            assert status in ("COMPLETED", "COMPLETED_SUCCESS"), (logs / "daemon.out").read_text()[-4000:]
    finally:
        for proc, _ in workers:
            os.killpg(proc.pid, 15)
        for proc, _ in workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)

    # every row covered, the steps spread over both workers, nothing written to a local disk in between
    covered = sql(data_db, "SELECT count(*) FROM jobs_enriched WHERE embedding IS NOT NULL AND summary IS NOT NULL")
    assert covered[0][0] == ROWS
    steps = {
        name: len(re.findall(r"Task execute_plan\[.*\] succeeded", log.read_text()))
        for (name, (_, log)) in zip(("w1", "w2"), workers, strict=True)
    }
    assert all(n > 0 for n in steps.values()) and sum(steps.values()) >= len(keys) * 5, steps
    assert any(k.endswith(".parquet") for k in _keys(s3))
    assert not list((home / "storage").rglob("*.parquet"))
    # the shared budget held across both workers: the server's own count, as in the single-machine test
    asked = server.count("chat") + server.count("embeddings")
    limited = server.count("chat", 429) + server.count("embeddings", 429)
    assert asked > ROWS and limited <= 2, (limited, asked)
    print(
        f"celery: {len(keys)} partitions, {sum(steps.values())} steps ({steps}), {ROWS} rows, {limited} of {asked} "
        "requests answered 429"
    )
