"""What a step reports: metadata values, accounting lines, progress with rate and ETA, the summary.

Plain functions returning plain values (Dagster turns ints, floats, strings and dicts into metadata).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from .config import ProviderSpec
from .detection import Reason
from .providers.base import Usage


class Log(Protocol):
    """Where a step writes its lines: a Dagster run's log or a standard logger."""

    def info(self, msg: str) -> None: ...

    def warning(self, msg: str) -> None: ...


def timing(started: float, rows: int) -> dict[str, float]:
    seconds = max(time.monotonic() - started, 1e-9)
    return {"duration_seconds": round(seconds, 3), "rows_per_second": round(rows / seconds, 1)}


def cost(usage: Usage, spec: ProviderSpec | None) -> float:
    if spec is None:
        return 0.0
    factor = spec.price_factor  # batch answers cost a share of the configured (realtime) prices
    return usage.cost(spec.price_per_million_input_tokens * factor, spec.price_per_million_output_tokens * factor)


def usage_metadata(usage: Usage, spec: ProviderSpec | None = None, prefix: str = "provider") -> dict[str, float]:
    return {
        f"{prefix}_cache_hits": usage.cache_hits,
        f"{prefix}_cost_usd": round(cost(usage, spec), 6),
        f"{prefix}_requests": usage.requests,
        f"{prefix}_inputs": usage.inputs,
        f"{prefix}_input_tokens": usage.input_tokens,
        f"{prefix}_output_tokens": usage.output_tokens,
        f"{prefix}_rate_limited": usage.rate_limited,
        f"{prefix}_retries": usage.retries,
        f"{prefix}_truncated_inputs": usage.truncated_inputs,
        f"{prefix}_input_tokens_counted_here": usage.tokens_counted_here,  # the server gave no usage for these
    }


def accounting_line(stage: str, usage: Usage, spec: ProviderSpec) -> str:
    return (
        f"{stage} accounting: {usage.requests} requests, {usage.input_tokens} tokens in, {usage.output_tokens} out, "
        f"{usage.rate_limited} rate-limited (429), {usage.retries} retries, {usage.cache_hits} cache hits, "
        f"{usage.truncated_inputs} inputs truncated, cost ${cost(usage, spec):.4f}"
    )


def progress_logger(log: Log, stage: str) -> Callable[[int, int], None]:
    """A progress callback that logs rows done, share, rate, elapsed time and ETA."""
    started = time.monotonic()

    def report(done: int, total: int) -> None:
        elapsed = max(time.monotonic() - started, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else float("inf")
        log.info(
            f"{stage}: {done}/{total} rows ({100 * done / max(total, 1):.1f}%), "
            f"{rate:.1f} rows/s, elapsed {elapsed:.1f}s, ETA {eta:.1f}s"
        )

    return report


def partition_summary(key: str, rows_in: int, written: int, counts: dict[str, int], failed: dict[str, int]) -> str:
    return (
        f"partition {key}: {rows_in} rows in, {written} written, {counts.get(Reason.OK.value, 0)} already up to "
        f"date, {counts.get(Reason.NO_TEXT.value, 0)} skipped (no text), {failed.get('enrichment', 0)} enrichment "
        f"failures, {failed.get('embedding', 0)} embedding failures, {counts.get(Reason.COOLING_DOWN.value, 0)} "
        "failed earlier and cooling down"
    )
