"""Paid results kept by (provider, model, dimension, content hash), so nothing is paid for twice.

The engine looks results up before calling a provider and stores each answer as soon as it arrives, so a
partition retried after a crash pays again for at most the requests that were in flight. Before sending,
it claims its texts for a short while (renewed while it works): a run that finds a text claimed by
another waits for that answer instead of paying for it too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import sqlite3
import sys
from typing import Protocol

import numpy as np

from .stores.base import ConnectionLostError, Ledger

SCHEMA_VERSION = "v1"  # bump when the enrichment schema changes, so old answers are not reused


class ResultCache(Protocol):
    async def get_many(self, keys: list[str]) -> dict[str, bytes]: ...

    async def put_many(self, items: dict[str, bytes]) -> None: ...

    async def claim(self, keys: list[str], owner: str, seconds: float) -> set[str]:
        """The keys ``owner`` now holds for ``seconds`` (new claims and renewals)."""
        ...

    async def release(self, keys: list[str], owner: str) -> None: ...

    async def aclose(self) -> None: ...


# waits before the retries of a put that met a cache server away (a restart): 15.5 s in all
KEEP_RETRY_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0)


def _away(exc: Exception) -> bool:
    """The cache's server is away (restarting, unreachable), which a wait can mend; a refusal cannot. The
    drivers' errors are looked up only when loaded: a process using neither does not import them."""
    kinds: list[type[BaseException]] = [ConnectionLostError, OSError, sqlite3.OperationalError]
    if (psycopg := sys.modules.get("psycopg")) is not None:
        kinds.append(psycopg.OperationalError)
    if (redis := sys.modules.get("redis.exceptions")) is not None:
        kinds.append(redis.ConnectionError)
    return isinstance(exc, tuple(kinds))


async def keep_paid(cache: ResultCache, items: dict[str, bytes], waits: tuple[float, ...] = KEEP_RETRY_SECONDS) -> None:
    """Put answers just paid for, waiting out a cache server's restart rather than losing them. The
    request's place in flight stays taken meanwhile, so nothing more is paid for while nothing can be kept."""
    for wait in waits:
        try:
            return await cache.put_many(items)
        except Exception as exc:
            if not _away(exc):
                raise
            await asyncio.sleep(wait)
    await cache.put_many(items)


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


def embedding_key(provider: str, model: str, dimension: int, text: str) -> str:
    return "emb:" + _digest(provider, model, dimension, hashlib.sha256(text.encode()).hexdigest())


def enrichment_key(provider: str, model: str, text: str) -> str:
    return f"enr:{SCHEMA_VERSION}:" + _digest(provider, model, hashlib.sha256(text.encode()).hexdigest())


def encode_vector(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def decode_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4")


def encode_answer(answer: dict) -> bytes:
    return json.dumps(answer, ensure_ascii=False).encode()


def decode_answer(data: bytes) -> dict:
    return json.loads(data)


class NullCache:
    async def get_many(self, keys: list[str]) -> dict[str, bytes]:
        return {}

    async def put_many(self, items: dict[str, bytes]) -> None:
        return None

    async def claim(self, keys: list[str], owner: str, seconds: float) -> set[str]:
        return set(keys)  # nothing is shared, so nothing is claimed by anyone else

    async def release(self, keys: list[str], owner: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


class StoreCache:
    """The cache table of the target database (``backfill_cache``)."""

    def __init__(self, ledger: Ledger, ttl_days: float) -> None:
        self.ledger, self.ttl_days = ledger, ttl_days

    async def get_many(self, keys: list[str]) -> dict[str, bytes]:
        return await asyncio.to_thread(self.ledger.cache_get, keys, self.ttl_days)

    async def put_many(self, items: dict[str, bytes]) -> None:
        await asyncio.to_thread(self.ledger.cache_put, items)

    async def claim(self, keys: list[str], owner: str, seconds: float) -> set[str]:
        return await asyncio.to_thread(self.ledger.cache_claim, keys, owner, seconds)

    async def release(self, keys: list[str], owner: str) -> None:
        await asyncio.to_thread(self.ledger.cache_release, keys, owner)

    async def aclose(self) -> None:
        return None


# A claim is taken when free or already ours (then renewed), atomically for the whole list.
_CLAIM_SCRIPT = """
local held = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if (not holder) or holder == ARGV[1] then
    redis.call('SET', key, ARGV[1], 'EX', ARGV[2])
    table.insert(held, i)
  end
end
return held
"""
_RELEASE_SCRIPT = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
"""


class RedisCache:
    """Redis, each entry with a time to live (30 days by default)."""

    def __init__(self, url: str, ttl_days: float, key_prefix: str = "backfill:") -> None:
        import redis.asyncio as aioredis

        self._client = aioredis.Redis.from_url(url)
        self.ttl_seconds = int(ttl_days * 86400)
        self.prefix = key_prefix

    async def get_many(self, keys: list[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        values = await self._client.mget([self.prefix + k for k in keys])
        return {k: v for k, v in zip(keys, values, strict=True) if isinstance(v, bytes)}

    async def put_many(self, items: dict[str, bytes]) -> None:
        if not items:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for key, value in items.items():
                pipe.set(self.prefix + key, value, ex=self.ttl_seconds)
            await pipe.execute()

    async def claim(self, keys: list[str], owner: str, seconds: float) -> set[str]:
        if not keys:
            return set()
        names = [f"{self.prefix}claim:{k}" for k in keys]
        held = await self._client.eval(_CLAIM_SCRIPT, len(names), *names, owner, math.ceil(seconds))
        return {keys[int(i) - 1] for i in held}

    async def release(self, keys: list[str], owner: str) -> None:
        if keys:
            names = [f"{self.prefix}claim:{k}" for k in keys]
            await self._client.eval(_RELEASE_SCRIPT, len(names), *names, owner)

    async def aclose(self) -> None:
        await self._client.aclose()
