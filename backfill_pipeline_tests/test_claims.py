"""Runs working at once pay for a text once: one claims it, the others wait for its answer; a claim whose
run died lapses. On each shared cache: the database (SQLite, Postgres) and Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from backfill_pipeline.cache import RedisCache, ResultCache, StoreCache
from backfill_pipeline.engine import CallPolicy, embed_texts
from backfill_pipeline.providers.base import EmbeddingProvider

from .pg import unavailable
from .test_leases import migrated_opener

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def caches(request, tmp_path: Path) -> Iterator[list[ResultCache]]:
    """Two caches on one shared backend, as two processes would open them."""
    if request.param != "redis":
        opener = migrated_opener(request.param, request, tmp_path)
        with ExitStack() as stack:
            yield [StoreCache(stack.enter_context(opener()).ledger, 30) for _ in range(2)]
        return
    import redis

    client = redis.Redis.from_url(REDIS)
    try:
        client.ping()
    except redis.ConnectionError:
        unavailable("no Redis on 127.0.0.1:6379")
    prefix = f"backfill-test-{uuid.uuid4().hex}:"
    try:
        yield [RedisCache(REDIS, 30, prefix) for _ in range(2)]
    finally:
        made = client.keys(f"{prefix}*")
        if made:
            client.delete(*made)


class CountingEmbedder(EmbeddingProvider):
    name, model, dimension, max_batch_size = "counting", "counting-1", 4, 8
    sent: Counter[str] = Counter()

    async def embed(self, texts: list[str]) -> np.ndarray:
        await asyncio.sleep(0.05)
        self.sent.update(texts)
        return np.ones((len(texts), 4), dtype=np.float32)


def _policy(cache: ResultCache, claim_seconds: float = 30.0) -> CallPolicy:
    return CallPolicy(cache=cache, claim_seconds=claim_seconds, claim_poll_seconds=0.05, max_in_flight=2)


def test_two_runs_at_once_pay_for_each_shared_text_once(caches: list[ResultCache]) -> None:
    shared = [f"shared posting {i}" for i in range(40)]
    first, second = shared + ["only in the first"], ["only in the second", *reversed(shared)]
    CountingEmbedder.sent = Counter()
    providers = [CountingEmbedder(), CountingEmbedder()]

    async def both() -> list:
        runs = [
            embed_texts(p, texts, batch_size=8, policy=_policy(c))
            for p, texts, c in zip(providers, (first, second), caches, strict=True)
        ]
        outcomes = await asyncio.gather(*runs)
        for cache in caches:
            await cache.aclose()
        return outcomes

    outcomes = asyncio.run(both())
    assert all(o.ok.all() and not o.failures and not o.unsent for o in outcomes)
    assert set(CountingEmbedder.sent) == set(first) | set(second)
    assert max(CountingEmbedder.sent.values()) == 1  # every text paid for once, across both runs
    waited = sum(p.usage.cache_hits for p in providers)
    assert waited == len(first) + len(second) - len(CountingEmbedder.sent)  # the rest came from the other run


def test_a_claim_whose_run_died_lapses_and_the_text_is_paid_for(caches: list[ResultCache]) -> None:
    texts = [f"posting {i}" for i in range(6)]
    CountingEmbedder.sent = Counter()
    provider = CountingEmbedder()

    async def run() -> tuple:
        from backfill_pipeline.engine.stages import EmbeddingStage

        stage = EmbeddingStage(provider, len(texts))
        dead = await caches[0].claim([stage.key(t) for t in texts[:3]], "a run that was killed", 1.0)
        assert len(dead) == 3
        started = time.monotonic()
        outcome = await embed_texts(provider, texts, batch_size=8, policy=_policy(caches[1], claim_seconds=1.0))
        for cache in caches:
            await cache.aclose()
        return outcome, time.monotonic() - started

    outcome, seconds = asyncio.run(run())
    assert outcome.ok.all() and not outcome.unsent
    assert set(CountingEmbedder.sent) == set(texts) and max(CountingEmbedder.sent.values()) == 1
    assert seconds >= 0.9  # it waited for the dead run's claims to lapse before paying
