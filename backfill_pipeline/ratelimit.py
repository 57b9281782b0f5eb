"""Requests- and tokens-per-minute budgets shared by every process that calls a provider.

Each request reserves its cost (one request, its tokens) from a budget kept in the database or Redis
with the generic cell rate algorithm, then waits until its slot comes. The shared state makes the budget
hold across partitions running at once in separate processes. On top, each process slows down when the
server answers 429 or reports it is out of budget (``x-ratelimit-*`` headers), and speeds up again.

Written here rather than with a library: the usual Python limiters (aiolimiter, limits, pyrate-limiter)
either keep their state in one process or cannot reserve a token cost that is known only per request.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from .config import RateLimitSpec
from .stores.base import Ledger


class BudgetBackend(Protocol):
    def reserve(self, key: str, request_seconds: float, token_seconds: float, burst_seconds: float) -> float: ...


class LocalBudget:
    """In-process budget, for a single process (tests, the embedded demo)."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def reserve(self, key: str, request_seconds: float, token_seconds: float, burst_seconds: float) -> float:
        with self._lock:
            now = time.time()
            request_tat, token_tat = self._state.get(key, (now, now))
            request_tat = max(request_tat, now) + request_seconds
            token_tat = max(token_tat, now) + token_seconds
            self._state[key] = (request_tat, token_tat)
        return max(0.0, request_tat - now - burst_seconds, token_tat - now - burst_seconds)


class StoreBudget:
    """The budget in the target database (``backfill_rate_limits``), shared by every process using it."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def reserve(self, key: str, request_seconds: float, token_seconds: float, burst_seconds: float) -> float:
        return self.ledger.reserve_budget(key, request_seconds, token_seconds, burst_seconds)


_RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local r = math.max(tonumber(redis.call('HGET', KEYS[1], 'r') or now), now) + tonumber(ARGV[1])
local k = math.max(tonumber(redis.call('HGET', KEYS[1], 't') or now), now) + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(k))
redis.call('EXPIRE', KEYS[1], 3600)
return tostring(math.max(0, r - now - tonumber(ARGV[3]), k - now - tonumber(ARGV[3])))
"""


class RedisBudget:
    """The budget in Redis: one atomic script per reservation, Redis's clock."""

    def __init__(self, url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url)
        self._script = self._client.register_script(_RESERVE_LUA)

    def reserve(self, key: str, request_seconds: float, token_seconds: float, burst_seconds: float) -> float:
        return float(
            self._script(keys=[f"backfill:budget:{key}"], args=[request_seconds, token_seconds, burst_seconds])
        )


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_reset(value: str | None) -> float | None:
    """OpenAI's reset durations ('1s', '6m0s', '20ms') or plain seconds, as seconds."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = _DURATION.findall(value)
    return sum(float(n) * scale[u] for n, u in parts) if parts else None


@dataclass
class RateSignals:
    """What a response said about the budget."""

    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None


class RateLimiter:
    """Paces one provider model's requests within its budget."""

    def __init__(self, backend: BudgetBackend, key: str, limits: RateLimitSpec, burst_seconds: float = 1.0):
        self.backend, self.key, self.limits, self.burst = backend, key, limits, burst_seconds
        self.multiplier = 1.0
        self._paused_until = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.limits.requests_per_minute or self.limits.tokens_per_minute)

    async def acquire(self, tokens: int) -> None:
        if not self.enabled:
            return
        pause = self._paused_until - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        rpm, tpm = self.limits.requests_per_minute, self.limits.tokens_per_minute
        request_seconds = 60.0 / (rpm * self.multiplier) if rpm else 0.0
        token_seconds = 60.0 * tokens / (tpm * self.multiplier) if tpm else 0.0
        delay = await asyncio.to_thread(self.backend.reserve, self.key, request_seconds, token_seconds, self.burst)
        if delay > 0:
            await asyncio.sleep(delay)

    def on_success(self, signals: RateSignals | None = None, next_tokens: int = 0) -> None:
        self.multiplier = min(1.0, self.multiplier * 1.02)
        if signals is None:
            return
        if signals.remaining_requests == 0 and signals.reset_requests:
            self.pause(signals.reset_requests)
        if signals.remaining_tokens is not None and signals.remaining_tokens < next_tokens and signals.reset_tokens:
            self.pause(signals.reset_tokens)

    def on_rate_limited(self, retry_after: float | None) -> None:
        self.multiplier = max(0.25, self.multiplier * 0.7)
        if retry_after:
            self.pause(retry_after)

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)
