"""How many database connections a running step holds: counted in pg_stat_activity (each is named
``backfill_pipeline:<dataset>``) while a partition runs against the loopback providers, with the lease
renewed several times during the provider steps. The README's connection budget states these bounds."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest

from backfill_pipeline.config import parse_config

from .fake_providers import OPENAI_KEY, ModelLimits
from .graph_helpers import metadata, register, run_partition
from .test_postgres_scenarios import posting, sql

REDIS = "redis://127.0.0.1:6379/0"


def _peak(url: str, name: str, stop: threading.Event, seen: list[int]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            [(n,)] = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
                [f"backfill_pipeline:{name}"],
            ).fetchall()
            seen.append(n)
            stop.wait(0.01)


@pytest.mark.parametrize(("backend", "bound"), [("database", 3), ("redis", 2)])
def test_a_running_step_holds_at_most_three_connections_two_with_redis(
    pg_db, server, instance, monkeypatch, backend: str, bound: int
) -> None:
    url, schema = pg_db
    name = f"conn_{uuid.uuid4().hex[:8]}"
    sql(url, f'CREATE TABLE "{schema}".jobs (id bigint PRIMARY KEY, title text, company text, description text)')
    with psycopg.connect(url) as conn:
        conn.cursor().executemany(
            f'INSERT INTO "{schema}".jobs VALUES (%s, %s, %s, %s)', [(i, *posting(i)) for i in range(60)]
        )
    server.limits["gpt-4o-mini"] = ModelLimits(latency_seconds=0.1)
    provider = {"provider": "openai", "base_url": server.openai_url, "max_in_flight": 4}
    dataset: dict = {
        "database_url": url,
        "schema": schema,
        "table": "jobs",
        "text": {"template": "{title} at {company}\n\n{description}"},
        "embedding": {**provider, "model": "text-embedding-3-small", "dimension": 64, "batch_size": 8},
        "enrichment": {**provider, "enabled": True, "model": "gpt-4o-mini"},
        "lease_seconds": 2,  # renewed every 0.5 s: several renewals while the provider steps run
    }
    prefix = f"backfill-test-{uuid.uuid4().hex}:"
    if backend == "redis":
        redis = pytest.importorskip("redis")
        try:
            redis.Redis.from_url(REDIS).ping()
        except redis.ConnectionError:
            pytest.skip("no Redis on 127.0.0.1:6379")
        dataset["cache"] = {"backend": "redis", "redis_url": REDIS, "key_prefix": prefix}
        dataset["rate_limiter"] = {"backend": "redis", "redis_url": REDIS}
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    config = parse_config({"datasets": {name: dataset}})
    from backfill_pipeline.stores import open_store

    with open_store(name, config.datasets[name]) as store:
        store.migrate()
    key = register(config, name, instance)[0]
    seen: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_peak, args=(url, name, stop, seen))
    sampler.start()
    try:
        result = run_partition(config, name, key, instance)
    finally:
        stop.set()
        sampler.join()
        if backend == "redis":
            client = redis.Redis.from_url(REDIS)
            made = client.keys(f"{prefix}*")
            if made:
                client.delete(*made)
    assert metadata(result, "written_table")["rows_written"] == 60
    assert len(seen) > 100 and max(seen) <= bound, max(seen)
    assert max(seen) >= bound - 1  # the sampler saw the step's connections at all
