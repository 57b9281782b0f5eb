"""Building the engine's call policy (shared rate budget, paid-results cache, retries) for a dataset."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence

from .cache import NullCache, RedisCache, ResultCache, StoreCache
from .config import DatasetConfig, EnvRef, ProviderSpec
from .engine import CallPolicy, RowFailure
from .ratelimit import BudgetBackend, LocalBudget, RateLimiter, RedisBudget, StoreBudget
from .stores import Failure, Ledger

_LOCAL_BUDGET = LocalBudget()  # one per process, for the 'local' backend


def _url(value: str | EnvRef | None) -> str:
    if isinstance(value, EnvRef):
        return value.resolve()
    return value or ""


def budget_key(spec: ProviderSpec) -> str:
    """Budgets belong to a provider account and model; the base URL tells accounts' servers apart."""
    where = hashlib.sha256((spec.base_url or "").encode()).hexdigest()[:8]
    return f"{spec.provider}:{spec.model}:{where}"


def build_policy(
    dataset: DatasetConfig,
    spec: ProviderSpec,
    ledger: Ledger,
    expected_output_tokens: int = 0,
    stop: Callable[[], bool] | None = None,
) -> CallPolicy:
    """The policy for one stage's calls; ``stop`` (when given) ends them gracefully, with the dataset's grace
    for the requests in flight."""
    limiter_spec = dataset.rate_limiter
    backend: BudgetBackend
    if limiter_spec.backend == "redis":
        backend = RedisBudget(_url(limiter_spec.redis_url))
    elif limiter_spec.backend == "database":
        backend = StoreBudget(ledger)
    else:
        backend = _LOCAL_BUDGET
    cache: ResultCache
    if dataset.cache.backend == "redis":
        cache = RedisCache(_url(dataset.cache.redis_url), dataset.cache.ttl_days, dataset.cache.key_prefix)
    elif dataset.cache.backend == "database":
        cache = StoreCache(ledger, dataset.cache.ttl_days)
    else:
        cache = NullCache()
    if spec.provider in ("offline", "local"):
        cache = NullCache()  # free and deterministic: nothing to save
    policy = CallPolicy(
        limiter=RateLimiter(backend, budget_key(spec), spec.rate_limit, limiter_spec.burst_seconds),
        cache=cache,
        retry=spec.retry,
        max_in_flight=spec.max_in_flight,
        expected_output_tokens=expected_output_tokens,
        claim_seconds=dataset.cache.claim_seconds,
    )
    if stop is not None:
        policy.stop, policy.stop_grace_seconds = stop, dataset.stop_grace_seconds
    return policy


def failure_recorder(ledger: Ledger, ids: Sequence[object], stage: str, one_at_a_time: asyncio.Lock) -> Callable:
    """The engine's ``record_failures`` for rows ``ids`` (the current window's, by index): paid answers that
    cannot be used go to the ledger as they come, one transaction at a time on its connection."""

    async def record(failed: list[RowFailure]) -> None:
        found = [Failure(ids[f.index], stage, f.error_class, f.message) for f in failed]
        async with one_at_a_time:
            await asyncio.to_thread(ledger.record_failures, found)

    return record
