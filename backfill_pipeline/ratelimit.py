"""Requests- and tokens-per-minute budgets shared by every process that calls a provider.

Each request reserves its cost (one request, its tokens) from a budget kept in the database or Redis
with the generic cell rate algorithm, then waits until its slot comes. The shared state makes the budget
hold across partitions running at once in separate processes. On top, each process reads the server's
``x-ratelimit-*`` headers (its limits, and the burst its bucket allows), waits when they say the budget is
spent, and slows down when the server answers 429, then speeds up again.

Written here rather than with a library: the usual Python limiters (aiolimiter, limits, pyrate-limiter)
either keep their state in one process or cannot reserve a token cost that is known only per request.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .config import RateLimitSpec
from .stores.base import Floors, Ledger


class BudgetBackend(Protocol):
    def reserve(
        self, key: str, request_seconds: float, token_seconds: float, burst_seconds: float, floors: Floors = (0, 0)
    ) -> float: ...

    def burst(self, key: str) -> float | None: ...

    def set_burst(self, key: str, seconds: float, lower: bool = False) -> float: ...


class LocalBudget:
    """In-process budget, for a single process (tests, the embedded demo)."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}
        self._bursts: dict[str, float] = {}
        self._lock = threading.Lock()

    def burst(self, key: str) -> float | None:
        return self._bursts.get(key)

    def set_burst(self, key: str, seconds: float, lower: bool = False) -> float:
        with self._lock:
            shared = self._bursts[key] = seconds if lower else max(seconds, self._bursts.get(key, seconds))
        return shared

    def reserve(
        self, key: str, request_seconds: float, token_seconds: float, burst_seconds: float, floors: Floors = (0, 0)
    ) -> float:
        with self._lock:
            now = time.time()
            request_tat, token_tat = self._state.get(key, (now, now))
            request_tat = max(request_tat, now + floors[0]) + request_seconds
            token_tat = max(token_tat, now + floors[1]) + token_seconds
            self._state[key] = (request_tat, token_tat)
        return max(0.0, request_tat - now - burst_seconds, token_tat - now - burst_seconds)


class StoreBudget:
    """The budget in the target database (``backfill_rate_limits``), shared by every process using it."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def reserve(
        self, key: str, request_seconds: float, token_seconds: float, burst_seconds: float, floors: Floors = (0, 0)
    ) -> float:
        return self.ledger.reserve_budget(key, request_seconds, token_seconds, burst_seconds, floors)

    def burst(self, key: str) -> float | None:
        return self.ledger.budget_burst(key)

    def set_burst(self, key: str, seconds: float, lower: bool = False) -> float:
        return self.ledger.set_budget_burst(key, seconds, lower)


_RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local r = math.max(tonumber(redis.call('HGET', KEYS[1], 'r') or now), now + tonumber(ARGV[4])) + tonumber(ARGV[1])
local k = math.max(tonumber(redis.call('HGET', KEYS[1], 't') or now), now + tonumber(ARGV[5])) + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(k))
redis.call('EXPIRE', KEYS[1], 3600)
return tostring(math.max(0, r - now - tonumber(ARGV[3]), k - now - tonumber(ARGV[3])))
"""


_SET_BURST_LUA = """
local old = tonumber(redis.call('HGET', KEYS[1], 'burst') or ARGV[1])
local new = tonumber(ARGV[1])
if ARGV[2] == '0' then new = math.max(old, new) end
redis.call('HSET', KEYS[1], 'burst', tostring(new))
return tostring(new)
"""


class RedisBudget:
    """The budget in Redis: one atomic script per reservation, Redis's clock."""

    def __init__(self, url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url)
        self._script = self._client.register_script(_RESERVE_LUA)
        self._set_burst = self._client.register_script(_SET_BURST_LUA)

    def reserve(
        self, key: str, request_seconds: float, token_seconds: float, burst_seconds: float, floors: Floors = (0, 0)
    ) -> float:
        args = [request_seconds, token_seconds, burst_seconds, *floors]
        return float(self._script(keys=[f"backfill:budget:{key}"], args=args))

    def burst(self, key: str) -> float | None:
        value = self._client.hget(f"backfill:budget:{key}", "burst")
        return float(value) if value is not None else None

    def set_burst(self, key: str, seconds: float, lower: bool = False) -> float:
        return float(self._set_burst(keys=[f"backfill:budget:{key}"], args=[seconds, int(lower)]))


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
    """What a response said about the budget (OpenAI's ``x-ratelimit-*`` headers, in the server's units)."""

    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None
    limit_requests: int | None = None
    limit_tokens: int | None = None


MAX_LEARNED_BURST_SECONDS = 60.0  # OpenAI's buckets hold a minute; nothing larger is believed
BURST_READ_SECONDS = 5.0  # how often a process looks at the burst the others learned
STOP_POLL_SECONDS = 0.05  # how soon a request waiting for its slot notices a stop
_MARGIN_SECONDS = 0.05  # arrivals jitter (a busy machine, a large body to parse): keep this much in the bucket


class RateLimiter:
    """Paces one provider model's requests within its budget.

    The limits are the configured ones, lowered to what the server's headers announce (``x-ratelimit-limit-*``),
    or taken from the headers when none is configured. The burst (how far ahead of the steady rate requests
    may go) is ``burst_seconds`` when configured; otherwise it starts at 1 s and follows the size of the
    server's bucket as its headers show it (``remaining`` plus the ``reset`` time until it is full; without a
    reset, ``remaining + this request``, a lower bound), halved by each 429, and is shared
    through the budget's backend with every process of the budget. A request costing
    more than the burst waits until the ones before it are paid for, as a full bucket is what admits it.
    """

    def __init__(self, backend: BudgetBackend, key: str, limits: RateLimitSpec, burst_seconds: float | None = None):
        self.backend, self.key, self.limits = backend, key, limits
        self.fixed_burst = burst_seconds is not None
        self.burst = burst_seconds if burst_seconds is not None else 1.0
        self.multiplier = 1.0
        self._paused_until = 0.0
        self._learned_rpm: int | None = None
        self._learned_tpm: int | None = None
        self._burst_ceiling = MAX_LEARNED_BURST_SECONDS  # lowered by a 429: a burst refused is not tried again
        self._debt: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (requests, tokens) in seconds, when seen
        self._burst_read_at = -BURST_READ_SECONDS  # when the shared burst was last read
        self._burst_changed = False  # learned or lowered here: to be shared
        self._lowered = False  # by a 429: the shared burst is lowered too, not only raised
        self._waiting_cap: int | None = None  # this run's requests waiting on the budget at once (rank > 0)
        self._waiting = 0
        self._turn: asyncio.Condition | None = None
        self._sharing: set[asyncio.Task] = set()  # learned bursts on their way to the shared backend
        self._reading: asyncio.Future[float | None] | None = None  # the shared burst, being read

    @property
    def requests_per_minute(self) -> int | None:
        return _lowest(self.limits.requests_per_minute, self._learned_rpm)

    @property
    def tokens_per_minute(self) -> int | None:
        return _lowest(self.limits.tokens_per_minute, self._learned_tpm)

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)

    def costs(self, tokens: int) -> tuple[float, float]:
        """Seconds of the request budget and of the token budget that one request of ``tokens`` uses."""
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        request_seconds = 60.0 / (rpm * self.multiplier) if rpm else 0.0
        token_seconds = 60.0 * tokens / (tpm * self.multiplier) if tpm else 0.0
        return request_seconds, token_seconds

    def set_rank(self, rank: int, in_flight: int) -> None:
        """Earlier partitions first: a run with ``rank`` live runs of earlier partitions keeps at most
        ``in_flight / 2**rank`` requests waiting on the shared budget, so under contention its share of the
        budget is that much smaller (the slots go to requests in the order they are reserved), and when
        the budget has room nothing waits and nothing changes. Partitions then finish one after another
        instead of together: what follows each one (embeddings, the write) overlaps the next one's calls,
        and a stopped backfill leaves fewer partitions half done."""
        # a raised cap lets waiting requests through as the next one in flight ends (each end wakes them)
        self._waiting_cap = None if rank <= 0 else max(1, in_flight >> rank)

    async def acquire(self, tokens: int, stop: Callable[[], bool] | None = None) -> bool:
        """Reserve a request of ``tokens`` and wait for its slot; False when ``stop`` turned true while it
        waited (the reservation is given back: the budget goes to the requests that are still sent)."""
        if not self.enabled:
            return True
        if self._turn is None:
            self._turn = asyncio.Condition()
        async with self._turn:
            await self._turn.wait_for(lambda: self._waiting_cap is None or self._waiting < self._waiting_cap)
            self._waiting += 1
        try:
            return await self._reserve_and_wait(tokens, stop)
        finally:
            async with self._turn:
                self._waiting -= 1
                self._turn.notify_all()

    async def give_back(self, tokens: int) -> None:
        """Return the reservation of a request that was not sent (a stop came as its slot did): left
        spent, a handover's unsent requests would hold the runs that go on back by seconds."""
        if self.enabled:
            request_seconds, token_seconds = self.costs(tokens)
            await asyncio.to_thread(self.backend.reserve, self.key, -request_seconds, -token_seconds, 0.0)

    async def _reserve_and_wait(self, tokens: int, stop: Callable[[], bool] | None) -> bool:
        pause = self._paused_until - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        if not self.fixed_burst:
            await self._share_burst()
        request_seconds, token_seconds = self.costs(tokens)
        burst = max(self.burst, request_seconds, token_seconds) - _MARGIN_SECONDS
        request_debt, token_debt, seen = self._debt
        since = time.monotonic() - seen
        floors = (max(0.0, request_debt - since), max(0.0, token_debt - since))
        delay = await asyncio.to_thread(self.backend.reserve, self.key, request_seconds, token_seconds, burst, floors)
        if not await _sleep_unless(delay, stop):
            await self.give_back(tokens)
            return False
        return True

    async def _share_burst(self) -> None:
        """Every process of a budget uses the same burst: one that started later would otherwise queue
        behind reservations made with a larger one (up to a minute on OpenAI) before learning it itself."""
        if self._burst_changed:
            self._burst_changed = False
            self.burst = await asyncio.to_thread(self.backend.set_burst, self.key, self.burst, self._lowered)
            self._lowered = False
        elif self._reading is not None or time.monotonic() - self._burst_read_at >= BURST_READ_SECONDS:
            # the requests that start together wait for one read: the first ones would otherwise all be
            # paced with the 1 s a new limiter starts from (a partition's whole embedding step, often)
            if self._reading is None:
                self._burst_read_at = time.monotonic()
                self._reading = asyncio.ensure_future(asyncio.to_thread(self.backend.burst, self.key))
            reading = self._reading
            shared = await reading
            if self._reading is reading:
                self._reading = None
            if shared is not None:
                self.burst = shared

    def on_success(
        self, signals: RateSignals | None = None, tokens: int = 0, next_tokens: int = 0, sent_at: float | None = None
    ) -> None:
        """A response came: speed up again after 429s, and learn from its headers (``tokens``: what this
        request cost, ``next_tokens``: what the next one will, ``sent_at``: when the request left, by
        ``time.monotonic()``; the server counted it on arrival, a whole latency before its answer)."""
        self.multiplier = min(1.0, self.multiplier * 1.02)
        if signals is None:
            return
        self._learned_rpm = signals.limit_requests or self._learned_rpm
        self._learned_tpm = signals.limit_tokens or self._learned_tpm
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        if not self.fixed_burst:
            self._learn_burst(signals, rpm, tpm, tokens)
            if self._burst_changed:
                self._share_soon()
        # The server's bucket as its headers show it: what it lacks of a full bucket is a debt the shared
        # budget must carry (it does, unless another client spends the same account or the server meters
        # more than estimated here). Paced dimensions take it as a floor of their next reservation, so it
        # is never counted twice; a dimension with no known limit can only wait.
        debts = [0.0, 0.0]
        for i, (limit, remaining, reset) in enumerate(
            [
                (rpm, signals.remaining_requests, signals.reset_requests),
                (tpm, signals.remaining_tokens, signals.reset_tokens),
            ]
        ):
            if remaining is None:
                continue
            if limit:
                debts[i] = self.burst - 60.0 * remaining / limit
            elif remaining < (1 if i == 0 else next_tokens):
                self.pause(reset or 0.0)
        # the debt as of the server's count: dated by when the request left, not when its answer came (dated
        # by the answer, every debt outlived itself by a latency and held the pace back that far); an answer
        # to an earlier request than the last one read does not replace it
        counted_at = time.monotonic() if sent_at is None else sent_at
        if max(debts) > 0 and counted_at >= self._debt[2]:
            self._debt = (debts[0], debts[1], counted_at)

    def _share_soon(self) -> None:
        """Share a learned burst now, not at this run's next request: a step whose requests all left at once
        (a partition's few embedding requests) has no next one, and the next partition would start again
        from 1 s."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the engine's loop (tests): shared at the next request
            return
        # the loop holds tasks weakly: each is kept here until done, or a pending share could be collected
        task = loop.create_task(self._share_burst())
        self._sharing.add(task)
        task.add_done_callback(self._sharing.discard)

    def _learn_burst(self, signals: RateSignals, rpm: int | None, tpm: int | None, tokens: int) -> None:
        held: list[float] = []  # seconds of budget the server's bucket holds when full, per dimension
        for limit, remaining, reset, cost in (
            (rpm, signals.remaining_requests, signals.reset_requests, 1),
            (tpm, signals.remaining_tokens, signals.reset_tokens, tokens),
        ):
            if limit and remaining:
                # what it holds now plus what it regains until full (OpenAI's reset: the time "until the
                # limit resets to its initial state"): its size; without a reset, what it held before this
                # request, a lower bound that a run paced below the size never raises to it
                held.append(60.0 * remaining / limit + (reset if reset else 60.0 * cost / limit))
        learned = min(min(held), self._burst_ceiling) if held else 0.0
        if learned > self.burst:
            self.burst, self._burst_changed = learned, True

    def request_token_cap(self) -> int | None:
        """The most tokens one request should carry: half the burst, so that requests never wait for a
        full bucket (which a late arrival turns into a 429) and the budget stays even."""
        tpm = self.tokens_per_minute
        return max(1, int(tpm / 60 * self.burst / 2)) if tpm else None

    def on_rate_limited(self, retry_after: float | None) -> None:
        self.multiplier = max(0.25, self.multiplier * 0.7)
        if not self.fixed_burst:
            self.burst = max(0.5, self.burst / 2)
            self._burst_ceiling, self._burst_changed, self._lowered = self.burst, True, True
        if retry_after:
            self.pause(retry_after)

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)


async def _sleep_unless(seconds: float, stop: Callable[[], bool] | None) -> bool:
    """Sleep ``seconds``, or less when ``stop`` turns true (then False)."""
    if stop is None:
        if seconds > 0:
            await asyncio.sleep(seconds)
        return True
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        if stop():
            return False
        await asyncio.sleep(min(left, STOP_POLL_SECONDS))
    return not stop()


def _lowest(configured: int | None, announced: int | None) -> int | None:
    return min(configured, announced) if configured and announced else configured or announced
