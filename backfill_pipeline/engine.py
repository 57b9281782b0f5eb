"""Runs a provider over many texts: batches, many requests in flight, per-row failures.

A failure never stops the partition: a batch the provider rejects as a whole is split in halves until
the row at fault is found, and each failed row is reported with its error class and message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import ValidationError

from .providers.base import EmbeddingProvider, Enrichment, EnrichmentProvider, ProviderError

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class RowFailure:
    index: int
    error_class: str
    message: str


@dataclass
class EmbedOutcome:
    vectors: np.ndarray
    ok: np.ndarray
    failures: list[RowFailure] = field(default_factory=list)


@dataclass
class EnrichOutcome:
    results: list[Enrichment | None]
    failures: list[RowFailure] = field(default_factory=list)


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


def _batches(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


async def embed_texts(
    provider: EmbeddingProvider,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_in_flight: int,
    progress: ProgressFn | None = None,
    progress_every: int = 1000,
) -> EmbedOutcome:
    n = len(texts)
    dim = provider.dimension
    vectors = np.zeros((n, dim), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    failures: list[RowFailure] = []
    gate = asyncio.Semaphore(max_in_flight)
    tracker = _Progress(n, progress, progress_every)
    size = min(batch_size, provider.max_batch_size)

    async def run(indices: list[int]) -> None:
        try:
            async with gate:
                result = await provider.embed([texts[i] for i in indices])
            result = np.asarray(result, dtype=np.float32)
            if result.shape != (len(indices), dim):
                raise ProviderError(
                    f"provider returned shape {result.shape}, expected {(len(indices), dim)}", "invalid_output"
                )
            finite = np.isfinite(result).all(axis=1)
            vectors[indices] = result
            ok[indices] = finite
            failures.extend(
                RowFailure(i, "invalid_output", "provider returned non-finite values")
                for i, good in zip(indices, finite, strict=True)
                if not good
            )
            tracker.add(len(indices))
        except Exception as exc:  # noqa: BLE001 - every failure becomes a row failure
            if len(indices) > 1 and error_class(exc) in ("permanent", "invalid_output"):
                half = len(indices) // 2
                await asyncio.gather(run(indices[:half]), run(indices[half:]))
                return
            failures.extend(RowFailure(i, error_class(exc), _message(exc)) for i in indices)
            tracker.add(len(indices))

    await asyncio.gather(*(run(b) for b in _batches(n, size)))
    return EmbedOutcome(vectors=vectors, ok=ok, failures=sorted(failures, key=lambda f: f.index))


async def enrich_texts(
    provider: EnrichmentProvider,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_in_flight: int,
    progress: ProgressFn | None = None,
    progress_every: int = 200,
) -> EnrichOutcome:
    n = len(texts)
    results: list[Enrichment | None] = [None] * n
    failures: list[RowFailure] = []
    gate = asyncio.Semaphore(max_in_flight)
    tracker = _Progress(n, progress, progress_every)

    async def run(indices: list[int]) -> None:
        try:
            async with gate:
                answers = await provider.enrich([texts[i] for i in indices])
            if len(answers) != len(indices):
                raise ProviderError(f"provider answered {len(answers)} of {len(indices)} rows", "invalid_output")
        except Exception as exc:  # noqa: BLE001
            failures.extend(RowFailure(i, error_class(exc), _message(exc)) for i in indices)
            tracker.add(len(indices))
            return
        for i, answer in zip(indices, answers, strict=True):
            if isinstance(answer, Exception):
                failures.append(RowFailure(i, error_class(answer), _message(answer)))
                continue
            try:
                results[i] = Enrichment.model_validate(answer)
            except ValidationError as exc:
                details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in exc.errors())
                failures.append(RowFailure(i, "invalid_output", f"answer violates the schema: {details}"))
        tracker.add(len(indices))

    await asyncio.gather(*(run(b) for b in _batches(n, batch_size)))
    return EnrichOutcome(results=results, failures=sorted(failures, key=lambda f: f.index))
