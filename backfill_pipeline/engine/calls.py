"""One provider request with its retries, the policy that paces and caches calls, and progress.

Errors are handled by class (see :class:`ProviderError`): rate limits and transient errors are retried
with backoff (Retry-After wins); everything else is returned to the stage, which records it for its rows.
A fatal error (bad key, unknown model) stops the step at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import ValidationError

from ..cache import NullCache, ResultCache
from ..config import ProviderRetrySpec
from ..providers.base import EmbeddingProvider, EnrichmentProvider, ProviderError
from ..ratelimit import LocalBudget, RateLimiter, RateLimitSpec
from ..redact import mask_secrets
from ..stopping import StopRequested

if TYPE_CHECKING:
    from .batch_stage import BatchJournal

ProgressFn = Callable[[int, int], None]


class FatalProviderError(RuntimeError):
    """The provider refuses every request (bad key, unknown model): the step stops."""


@dataclass(frozen=True)
class RowFailure:
    index: int
    error_class: str
    message: str
    attempts: int = 1
    recorded: bool = False  # already in the failures table (a paid answer that could not be used)


@dataclass
class CallPolicy:
    """How calls are paced, retried and cached; the defaults suit tests and offline providers."""

    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(LocalBudget(), "local", RateLimitSpec()))
    cache: ResultCache = field(default_factory=NullCache)
    retry: ProviderRetrySpec = field(default_factory=ProviderRetrySpec)
    max_in_flight: int = 8
    expected_output_tokens: int = 0
    stop: Callable[[], bool] = lambda: False  # a graceful stop was requested: send nothing more
    stop_grace_seconds: float = 10.0  # how long requests in flight may still take after a stop
    # records rows whose paid answer cannot be used, as they come (as the cache keeps good answers)
    record_failures: Callable[[list[RowFailure]], Awaitable[None]] | None = None
    claim_seconds: float = 30.0  # a claim on a text being paid for lapses this long after its last renewal
    claim_poll_seconds: float = 0.25  # how often a run waiting for another run's answer looks for it
    batches: BatchJournal | None = None  # mode: batch: the partition's batch records (see .batch_stage)


def error_class(exc: BaseException) -> str:
    if isinstance(exc, ProviderError):
        return exc.kind
    if isinstance(exc, ValidationError):
        return "invalid_output"
    return type(exc).__name__


def error_message(exc: BaseException, limit: int = 1000) -> str:
    """The error's words as stored and logged: key-like text masked, cut to ``limit`` characters."""
    text = mask_secrets(str(exc) or type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Progress:
    """Calls ``fn(done, total)`` at most every ``every`` rows or ``seconds`` seconds, and at the end."""

    def __init__(self, total: int, fn: ProgressFn | None, every: int, seconds: float = 15.0):
        self.total, self.fn, self.every, self.seconds = total, fn, max(every, 1), seconds
        self.done = 0
        self._last_rows = 0
        self._last_time = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        if self.fn is None:
            return
        now = time.monotonic()
        if (
            self.done == self.total
            or self.done - self._last_rows >= self.every
            or now - self._last_time >= self.seconds
        ):
            self._last_rows, self._last_time = self.done, now
            self.fn(self.done, self.total)


async def call_with_retries(
    provider: EmbeddingProvider | EnrichmentProvider,
    send: Callable[[], Awaitable],
    *,
    inputs: int,
    tokens: int,
    policy: CallPolicy,
    gate: asyncio.Semaphore,
) -> tuple[object, int]:
    """One request with its retries; returns the answer and the number of attempts, or raises the last error."""
    retry = policy.retry
    for attempt in range(1, retry.max_attempts + 1):
        async with gate:
            if policy.stop() or not await policy.limiter.acquire(tokens, policy.stop):
                raise StopRequested
            provider.usage.requests += 1
            provider.usage.inputs += inputs
            sent_at = time.monotonic()
            try:
                answer = await send()
            except ProviderError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - unexpected errors are treated as transient
                error = ProviderError(f"{type(exc).__name__}: {exc}", "transient")
            else:
                policy.limiter.on_success(provider.last_signals, tokens=tokens, next_tokens=tokens, sent_at=sent_at)
                return answer, attempt
        if error.kind == "fatal":
            raise FatalProviderError(f"{provider.name} {provider.model}: {error_message(error)}") from None
        if error.kind == "rate_limit":
            provider.usage.rate_limited += 1
            policy.limiter.on_rate_limited(error.retry_after)
            delay = error.retry_after or retry.rate_limit_base_seconds * 2 ** (attempt - 1)
        elif error.kind == "transient":
            delay = retry.transient_base_seconds * 2 ** (attempt - 1)
        else:
            raise error
        if attempt == retry.max_attempts:
            error.attempts = attempt
            raise error
        if policy.stop():
            raise StopRequested  # not retried now: the rows stay unsettled, for the next run
        provider.usage.retries += 1
        await asyncio.sleep(delay * random.uniform(0.9, 1.25))  # jitter: processes do not retry in lockstep
    raise AssertionError("unreachable")


async def finish_or_stop(work: asyncio.Future, policy: CallPolicy) -> None:
    """Wait for ``work``; after a stop is requested, give the requests in flight a grace, then cancel."""
    loop = asyncio.get_running_loop()
    deadline: float | None = None
    while not work.done():
        await asyncio.wait({work}, timeout=0.2)
        if deadline is None and policy.stop():
            deadline = loop.time() + policy.stop_grace_seconds
        if deadline is not None and loop.time() >= deadline and not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            return
    work.result()  # a fatal provider error stops the step


def batches(
    indices: Sequence[int], tokens: Sequence[int] | Mapping[int, int], max_inputs: int, max_tokens: int | None
) -> list[list[int]]:
    """Consecutive groups of at most ``max_inputs`` indices and ``max_tokens`` tokens."""
    out: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in indices:
        if current and (len(current) >= max_inputs or (max_tokens is not None and used + tokens[i] > max_tokens)):
            out.append(current)
            current, used = [], 0
        current.append(i)
        used += tokens[i]
    if current:
        out.append(current)
    return out
