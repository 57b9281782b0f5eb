"""Runs a provider over many texts at the rate limit without losing paid work.

For each stage: texts are cut to the model's limit and counted; answers already paid for come from the
cache; identical texts are sent once; the rest go in batches that respect the provider's input and token
limits, many requests in flight, each one first reserving its share of the shared rate budget. Errors are
handled by class (see :class:`ProviderError`): rate limits and transient errors are retried with backoff
(Retry-After wins), a batch rejected as a whole is split until the row at fault is found, invalid answers
are recorded for their row and never retried blindly. Each answer is cached as soon as it arrives, so a
crash pays again for at most the requests that were in flight. A failure never stops the partition,
except a fatal one (bad key, unknown model), which stops it at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import ValidationError

from .cache import (
    NullCache,
    ResultCache,
    decode_answer,
    decode_vector,
    embedding_key,
    encode_answer,
    encode_vector,
    enrichment_key,
)
from .config import ProviderRetrySpec
from .providers.base import EmbeddingProvider, Enrichment, EnrichmentProvider, ProviderError
from .ratelimit import LocalBudget, RateLimiter, RateLimitSpec

ProgressFn = Callable[[int, int], None]


class FatalProviderError(RuntimeError):
    """The provider refuses every request (bad key, unknown model): the step stops."""


@dataclass(frozen=True)
class RowFailure:
    index: int
    error_class: str
    message: str
    attempts: int = 1


@dataclass
class EmbedOutcome:
    vectors: np.ndarray
    ok: np.ndarray
    failures: list[RowFailure] = field(default_factory=list)


@dataclass
class EnrichOutcome:
    results: list[Enrichment | None]
    failures: list[RowFailure] = field(default_factory=list)


@dataclass
class CallPolicy:
    """How calls are paced, retried and cached; the defaults suit tests and offline providers."""

    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(LocalBudget(), "local", RateLimitSpec()))
    cache: ResultCache = field(default_factory=NullCache)
    retry: ProviderRetrySpec = field(default_factory=ProviderRetrySpec)
    max_in_flight: int = 8
    expected_output_tokens: int = 0


def error_class(exc: BaseException) -> str:
    if isinstance(exc, ProviderError):
        return exc.kind
    if isinstance(exc, ValidationError):
        return "invalid_output"
    return type(exc).__name__


def _message(exc: BaseException, limit: int = 1000) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Progress:
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
            await policy.limiter.acquire(tokens)
            provider.usage.requests += 1
            provider.usage.inputs += inputs
            try:
                answer = await send()
            except ProviderError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - unexpected errors are treated as transient
                error = ProviderError(f"{type(exc).__name__}: {exc}", "transient")
            else:
                policy.limiter.on_success(provider.last_signals, tokens)
                return answer, attempt
        if error.kind == "fatal":
            raise FatalProviderError(f"{provider.name} {provider.model}: {error}") from None
        if error.kind == "rate_limit":
            provider.usage.rate_limited += 1
            policy.limiter.on_rate_limited(error.retry_after)
            delay = error.retry_after or retry.rate_limit_base_seconds * 2 ** (attempt - 1)
        elif error.kind == "transient":
            delay = retry.transient_base_seconds * 2 ** (attempt - 1)
        else:
            raise error
        if attempt == retry.max_attempts:
            error.attempts = attempt  # type: ignore[attr-defined]
            raise error
        provider.usage.retries += 1
        await asyncio.sleep(delay * random.uniform(0.9, 1.25))  # jitter: processes do not retry in lockstep
    raise AssertionError("unreachable")


def _batches(indices: Sequence[int], tokens: Sequence[int], max_inputs: int, max_tokens: int | None) -> list[list[int]]:
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in indices:
        if current and (len(current) >= max_inputs or (max_tokens is not None and used + tokens[i] > max_tokens)):
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += tokens[i]
    if current:
        batches.append(current)
    return batches


def _fail_batch(
    batch: list[int],
    groups: dict[str, list[int]],
    keys: Sequence[str],
    exc: BaseException,
    failures: list[RowFailure],
    tracker: _Progress,
) -> None:
    """Record ``exc`` for every row a failed request stood for (identical texts share a request)."""
    attempts = getattr(exc, "attempts", 1)
    for i in batch:
        members = groups[keys[i]]
        failures.extend(RowFailure(m, error_class(exc), _message(exc), attempts) for m in members)
        tracker.add(len(members))


def _unique(keys: Sequence[str], wanted: Sequence[int]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i in wanted:
        groups.setdefault(keys[i], []).append(i)
    return groups


async def embed_texts(
    provider: EmbeddingProvider,
    texts: Sequence[str],
    *,
    batch_size: int,
    policy: CallPolicy | None = None,
    max_in_flight: int | None = None,
    progress: ProgressFn | None = None,
    progress_every: int = 1000,
) -> EmbedOutcome:
    policy = policy or CallPolicy()
    n, dim = len(texts), provider.dimension
    vectors = np.zeros((n, dim), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    failures: list[RowFailure] = []
    sent, tokens, truncated = provider.prepare(list(texts))
    provider.usage.truncated_inputs += truncated
    keys = [embedding_key(provider.name, provider.model, dim, t) for t in sent]
    tracker = _Progress(n, progress, progress_every)

    cached = await policy.cache.get_many(sorted(set(keys)))
    for i, key in enumerate(keys):
        if key in cached:
            vector = decode_vector(cached[key])
            if vector.shape == (dim,):
                vectors[i], ok[i] = vector, True
    provider.usage.cache_hits += int(ok.sum())
    tracker.add(int(ok.sum()))
    groups = _unique(keys, [i for i in range(n) if not ok[i]])
    leaders = [members[0] for members in groups.values()]  # identical texts are paid for once
    gate = asyncio.Semaphore(max_in_flight or policy.max_in_flight)
    size = min(batch_size, provider.max_batch_size)

    async def run(batch: list[int]) -> None:
        try:
            answer, _ = await call_with_retries(
                provider,
                lambda: provider.embed([sent[i] for i in batch]),
                inputs=len(batch),
                tokens=sum(tokens[i] for i in batch),
                policy=policy,
                gate=gate,
            )
            result = np.asarray(answer, dtype=np.float32)
            if result.shape != (len(batch), dim):
                raise ProviderError(
                    f"provider returned shape {result.shape}, expected {(len(batch), dim)}", "invalid_output"
                )
        except FatalProviderError:
            raise
        except Exception as exc:  # noqa: BLE001 - every other failure becomes a row failure
            if len(batch) > 1 and error_class(exc) in ("permanent", "invalid_output"):
                half = len(batch) // 2
                await asyncio.gather(run(batch[:half]), run(batch[half:]))
                return
            _fail_batch(batch, groups, keys, exc, failures, tracker)
            return
        finite = np.isfinite(result).all(axis=1)
        fresh: dict[str, bytes] = {}
        for i, vector, good in zip(batch, result, finite, strict=True):
            members = groups[keys[i]]
            if good:
                vectors[members], ok[members] = vector, True
                fresh[keys[i]] = encode_vector(vector)
            else:
                failures.extend(RowFailure(m, "invalid_output", "provider returned non-finite values") for m in members)
            tracker.add(len(members))
        await policy.cache.put_many(fresh)  # paid for: keep it before anything else can go wrong

    await asyncio.gather(*(run(b) for b in _batches(leaders, tokens, size, provider.max_batch_tokens)))
    return EmbedOutcome(vectors=vectors, ok=ok, failures=sorted(failures, key=lambda f: f.index))


async def enrich_texts(
    provider: EnrichmentProvider,
    texts: Sequence[str],
    *,
    batch_size: int,
    policy: CallPolicy | None = None,
    max_in_flight: int | None = None,
    progress: ProgressFn | None = None,
    progress_every: int = 200,
) -> EnrichOutcome:
    policy = policy or CallPolicy()
    n = len(texts)
    results: list[Enrichment | None] = [None] * n
    failures: list[RowFailure] = []
    sent, tokens, truncated = provider.prepare(list(texts))
    provider.usage.truncated_inputs += truncated
    keys = [enrichment_key(provider.name, provider.model, t) for t in sent]
    tracker = _Progress(n, progress, progress_every)

    def accept(i: int, answer: object) -> bool:
        if isinstance(answer, Exception):
            failures.append(RowFailure(i, error_class(answer), _message(answer)))
            return False
        try:
            results[i] = Enrichment.model_validate(answer)
            return True
        except ValidationError as exc:
            details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in exc.errors())
            failures.append(RowFailure(i, "invalid_output", f"answer violates the schema: {details}"))
            return False

    cached = await policy.cache.get_many(sorted(set(keys)))
    hits = 0
    for i, key in enumerate(keys):
        if key in cached:
            results[i] = Enrichment.model_validate(decode_answer(cached[key]))
            hits += 1
    provider.usage.cache_hits += hits
    tracker.add(hits)
    groups = _unique(keys, [i for i in range(n) if results[i] is None])
    leaders = [members[0] for members in groups.values()]
    gate = asyncio.Semaphore(max_in_flight or policy.max_in_flight)
    size = min(batch_size, provider.max_batch_size)

    async def run(batch: list[int]) -> None:
        try:
            answers, _ = await call_with_retries(
                provider,
                lambda: provider.enrich([sent[i] for i in batch]),
                inputs=len(batch),
                tokens=sum(tokens[i] for i in batch) + policy.expected_output_tokens * len(batch),
                policy=policy,
                gate=gate,
            )
            if len(answers) != len(batch):
                raise ProviderError(f"provider answered {len(answers)} of {len(batch)} rows", "invalid_output")
        except FatalProviderError:
            raise
        except Exception as exc:  # noqa: BLE001
            _fail_batch(batch, groups, keys, exc, failures, tracker)
            return
        fresh: dict[str, bytes] = {}
        for i, answer in zip(batch, answers, strict=True):
            members = groups[keys[i]]
            if accept(i, answer):
                fresh[keys[i]] = encode_answer(results[i].model_dump())  # type: ignore[union-attr]
                for member in members[1:]:
                    results[member] = results[i]
            else:
                failures.extend(RowFailure(m, failures[-1].error_class, failures[-1].message) for m in members[1:])
            tracker.add(len(members))
        await policy.cache.put_many(fresh)

    await asyncio.gather(*(run(b) for b in _batches(leaders, tokens, size, None)))
    return EnrichOutcome(results=results, failures=sorted(failures, key=lambda f: f.index))
