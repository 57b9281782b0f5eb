"""Rate budgets and the paid-results cache on each backend: database (SQLite, Postgres) and Redis."""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
import pytest

from backfill_pipeline.cache import RedisCache, StoreCache, decode_vector, embedding_key, encode_vector
from backfill_pipeline.config import RateLimitSpec, parse_config
from backfill_pipeline.ratelimit import LocalBudget, RateLimiter, RateSignals, RedisBudget, StoreBudget, parse_reset
from backfill_pipeline.stores import open_store

from .pg import unavailable


def _pacing(backend, key: str | None = None) -> list[float]:
    key = key or f"test:{uuid.uuid4().hex}"
    # 10 requests of 0.1 s each against a 0.2 s burst: the first fit, then each waits 0.1 s longer
    return [backend.reserve(key, 0.1, 0.0, 0.2) for _ in range(6)]


def _assert_paced(delays: list[float]) -> None:
    assert delays[0] == pytest.approx(0.0, abs=0.02)
    steps = np.diff(delays[2:])
    assert np.allclose(steps, 0.1, atol=0.03), delays


@pytest.fixture
def pg_store(pg_db):
    url, schema = pg_db
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{schema}".t (id bigint PRIMARY KEY, body text)')
    config = parse_config(
        {
            "datasets": {
                "t": {
                    "database_url": url,
                    "schema": schema,
                    "table": "t",
                    "text": {"columns": ["body"]},
                    "embedding": {"dimension": 4},
                }
            }
        }
    )
    store = open_store("t", config.datasets["t"])
    store.migrate()
    yield store
    store.close()


@pytest.fixture
def sqlite_store(demo_db, demo_config_path):
    from backfill_pipeline.config import load_config

    store = open_store("jobs", load_config(demo_config_path).datasets["jobs"])
    yield store
    store.close()


@pytest.fixture
def redis_url():
    import redis

    url = "redis://127.0.0.1:6379/0"
    try:
        redis.Redis.from_url(url).ping()
    except redis.ConnectionError:
        unavailable("no Redis on 127.0.0.1:6379")
    return url


def test_local_budget_paces() -> None:
    _assert_paced(_pacing(LocalBudget()))


def test_sqlite_budget_paces(sqlite_store) -> None:
    _assert_paced(_pacing(StoreBudget(sqlite_store.ledger)))


def test_postgres_budget_paces(pg_store) -> None:
    _assert_paced(_pacing(StoreBudget(pg_store.ledger)))


def test_redis_budget_paces(redis_url) -> None:
    import redis

    key = f"test:{uuid.uuid4().hex}"
    try:
        _assert_paced(_pacing(RedisBudget(redis_url), key))
    finally:
        redis.Redis.from_url(redis_url).delete(f"backfill:budget:{key}")


def test_token_budget_counts_tokens(pg_store) -> None:
    backend = StoreBudget(pg_store.ledger)
    key = f"tokens:{uuid.uuid4().hex}"
    first = backend.reserve(key, 0.0, 1.0, 0.5)  # a request worth one second of the token budget
    second = backend.reserve(key, 0.0, 1.0, 0.5)
    assert first == pytest.approx(0.5, abs=0.05) and second == pytest.approx(1.5, abs=0.05)


@pytest.mark.parametrize("kind", ["local", "sqlite", "postgres", "redis"])
def test_budget_shares_a_burst_and_takes_the_servers_debt_as_a_floor(kind, request) -> None:
    key = f"burst:{uuid.uuid4().hex}"
    backend = {
        "local": lambda: LocalBudget(),
        "sqlite": lambda: StoreBudget(request.getfixturevalue("sqlite_store").ledger),
        "postgres": lambda: StoreBudget(request.getfixturevalue("pg_store").ledger),
        "redis": lambda: RedisBudget(request.getfixturevalue("redis_url")),
    }[kind]()
    try:
        assert backend.burst(key) is None
        assert backend.set_burst(key, 30.0) == 30.0
        assert backend.set_burst(key, 12.5) == 30.0  # learned by a process that came later: the larger stays
        assert backend.set_burst(key, 12.5, lower=True) == 12.5  # after a 429
        assert backend.burst(key) == 12.5
        # the server showed 2 s of debt: the next reservation (0.1 s) lands after it, beyond a 0.5 s burst
        assert backend.reserve(key, 0.0, 0.1, 0.5, (0.0, 2.0)) == pytest.approx(1.6, abs=0.05)
        # a floor already carried is not added again
        assert backend.reserve(key, 0.0, 0.1, 0.5, (0.0, 1.0)) == pytest.approx(1.7, abs=0.05)
    finally:
        if kind == "redis":
            import redis

            redis.Redis.from_url(request.getfixturevalue("redis_url")).delete(f"backfill:budget:{key}")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_database_cache_round_trip_and_age(kind, request) -> None:
    store = request.getfixturevalue("sqlite_store" if kind == "sqlite" else "pg_store")
    vector = np.arange(4, dtype=np.float32) / 7
    key = embedding_key("openai", "text-embedding-3-small", 4, f"text {uuid.uuid4()}")
    cache = StoreCache(store.ledger, ttl_days=30)
    asyncio.run(cache.put_many({key: encode_vector(vector)}))
    found = asyncio.run(cache.get_many([key, "emb:absent"]))
    assert list(found) == [key]
    np.testing.assert_array_equal(decode_vector(found[key]), vector)
    assert asyncio.run(StoreCache(store.ledger, ttl_days=1e-9).get_many([key])) == {}  # older than the TTL


def test_redis_cache_round_trip(redis_url) -> None:
    key = f"test:{uuid.uuid4().hex}"

    async def go():
        cache = RedisCache(redis_url, ttl_days=30, key_prefix=f"test-{uuid.uuid4().hex}:")
        try:
            await cache.put_many({key: b"paid"})
            return await cache.get_many([key, key + "-absent"]), await cache._client.ttl(cache.prefix + key)
        finally:
            await cache._client.delete(cache.prefix + key)
            await cache.aclose()

    found, ttl = asyncio.run(go())
    assert found == {key: b"paid"} and 29 * 86400 < ttl <= 30 * 86400


def test_headers_saying_the_budget_is_spent_pause_for_what_is_missing() -> None:
    """No request left: wait one request's share of the minute (not the bucket's full reset). Too few
    tokens left for the next request: wait for the missing ones to refill."""
    limiter = RateLimiter(
        LocalBudget(), "h", RateLimitSpec(requests_per_minute=150, tokens_per_minute=6000), burst_seconds=10
    )
    limiter.on_success(RateSignals(remaining_requests=0, reset_requests=30.0), next_tokens=10)
    started = time.monotonic()
    asyncio.run(limiter.acquire(10))
    assert 0.35 <= time.monotonic() - started < 2  # 60 / 150 = 0.4 s, not the 30 s reset
    limiter.on_success(RateSignals(remaining_requests=50, remaining_tokens=40, reset_tokens=60.0), next_tokens=100)
    started = time.monotonic()
    asyncio.run(limiter.acquire(100))
    assert 0.55 <= time.monotonic() - started < 2  # 60 missing tokens at 100 tokens/s


def test_429_slows_down_then_speeds_up_again() -> None:
    limiter = RateLimiter(LocalBudget(), "m", RateLimitSpec(requests_per_minute=600))
    limiter.on_rate_limited(None)
    limiter.on_rate_limited(None)
    assert limiter.multiplier == pytest.approx(0.49)
    for _ in range(50):
        limiter.on_success()
    assert limiter.multiplier == 1.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("0.5", 0.5), ("1h2m", 3720.0), (None, None), ("soon", None)],
)
def test_parse_reset(text, seconds) -> None:
    assert parse_reset(text) == (pytest.approx(seconds) if seconds is not None else None)
