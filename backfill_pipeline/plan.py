"""The dry run: what needs work and what it would cost, without calling a provider or writing a row.

The plan counts what the engine would send, partition by partition as runs would: texts cut to the
model's limit and counted with the provider's own tokenizer, identical texts once, answers already in the
paid-results cache left out, and requests made with every per-request limit (inputs and tokens). It works
before `migrate` (result columns not there yet count as empty) and says what is missing.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .cache import NullCache, ResultCache, embedding_key, enrichment_key
from .config import DatasetConfig, EmbeddingSpec, EnrichmentSpec, ProviderSpec, RateLimitSpec
from .detection import apply_limit, detect
from .engine.batch_stage import plan_batches
from .engine.calls import batches
from .partitions import partition_activity, partition_spec
from .policy import build_policy
from .providers import build_embedding_provider, build_enrichment_provider
from .providers.base import EmbeddingProvider, EnrichmentProvider
from .stores import Ledger, open_store
from .table_scan import read_pending

PLACEHOLDER_KEY = "plan-makes-no-call"  # providers are built to count and batch, never to send


@dataclass
class StageEstimate:
    rows: int = 0
    distinct: int = 0
    cached: int = 0
    truncated: int = 0
    tokens: int = 0  # input tokens of the texts still to pay for
    requests: int = 0
    batches: int = 0  # mode: batch: batches submitted (at least one per partition with work)

    def add(self, other: StageEstimate) -> None:
        for name in ("rows", "distinct", "cached", "truncated", "tokens", "requests", "batches"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def to_pay(self) -> int:
        return self.distinct - self.cached


@dataclass
class Plan:
    name: str
    dataset: DatasetConfig
    reasons: Counter = field(default_factory=Counter)
    embedding: StageEstimate = field(default_factory=StageEstimate)
    enrichment: StageEstimate = field(default_factory=StageEstimate)
    missing: list[str] = field(default_factory=list)
    work_by_partition: dict[str, int] = field(default_factory=dict)  # rows needing work, after any limit

    @property
    def rows(self) -> int:
        return sum(self.reasons.values())

    def cost_at(self, embedding_factor: float, enrichment_factor: float) -> float:
        """The cost with each stage's configured prices multiplied by its factor (1: realtime)."""
        emb, enr = self.dataset.embedding, self.dataset.enrichment
        output_tokens = self.enrichment.to_pay * enr.expected_output_tokens
        return (
            embedding_factor * self.embedding.tokens / 1e6 * emb.price_per_million_input_tokens
            + enrichment_factor
            * (
                self.enrichment.tokens / 1e6 * enr.price_per_million_input_tokens
                + output_tokens / 1e6 * enr.price_per_million_output_tokens
            )
        )

    @property
    def cost(self) -> float:
        """At the configured prices in each stage's configured mode."""
        return self.cost_at(self.dataset.embedding.price_factor, self.dataset.enrichment.price_factor)

    @property
    def realtime_cost(self) -> float:
        return self.cost_at(1.0, 1.0)

    @property
    def batch_cost(self) -> float:
        return self.cost_at(self.dataset.embedding.batch.price_factor, self.dataset.enrichment.batch.price_factor)

    @property
    def minutes(self) -> float:
        emb, enr = self.dataset.embedding, self.dataset.enrichment
        output_tokens = self.enrichment.to_pay * enr.expected_output_tokens
        return max(  # a batch-mode stage is not paced by the rate limits (the provider answers within 24 h)
            0.0 if emb.mode == "batch" else _minutes(self.embedding.requests, self.embedding.tokens, emb.rate_limit),
            0.0
            if enr.mode == "batch"
            else _minutes(self.enrichment.requests, self.enrichment.tokens + output_tokens, enr.rate_limit),
        )

    def as_dict(self) -> dict[str, object]:
        emb, enr = self.dataset.embedding, self.dataset.enrichment
        out: dict[str, object] = {
            "dataset": self.name,
            "rows": self.rows,
            "reasons": dict(sorted(self.reasons.items())),
            "embedding": {"provider": emb.provider, "model": emb.model, "mode": emb.mode, **vars(self.embedding)},
            "estimated_cost_usd": round(self.cost, 6),
            "estimated_cost_realtime_usd": round(self.realtime_cost, 6),
            "estimated_cost_batch_usd": round(self.batch_cost, 6),
            "minimum_minutes": round(self.minutes, 2),
            "not_migrated": self.missing,
        }
        if enr.enabled:
            out["enrichment"] = {
                "provider": enr.provider,
                "model": enr.model,
                "mode": enr.mode,
                **vars(self.enrichment),
            }
        return out

    def lines(self) -> list[str]:
        emb, enr = self.dataset.embedding, self.dataset.enrichment
        out = [f"{self.name}: {self.rows} rows"]
        out += [f"  {reason:<24} {count}" for reason, count in sorted(self.reasons.items())]
        out.append(_stage_line("embedding: ", self.embedding, emb))
        if enr.enabled:
            out.append(_stage_line("enrichment:", self.enrichment, enr))
        modes = f"embedding {emb.mode}" + (f", enrichment {enr.mode}" if enr.enabled else "")
        out.append(
            f"  estimated cost ${self.cost:.4f} at configured prices ({modes}); realtime ${self.realtime_cost:.4f}, "
            f"batch ${self.batch_cost:.4f} (the batch APIs' discount, answered within 24 h)"
        )
        out.append(f"  at least {self.minutes:.1f} min at configured limits (batch-mode stages are not rate-paced)")
        for label, spec, e in (("embedding", emb, self.embedding), ("enrichment", enr, self.enrichment)):
            if spec.mode == "batch" and (label == "embedding" or enr.enabled):
                out.append(f"  {label} batches: {e.batches} ({_batch_limits(spec)})")
        if self.missing:
            out.append(
                f"  not migrated yet: {', '.join(self.missing)} (run `backfill-pipeline migrate`); planned as if "
                "they were empty"
            )
        return out


def _stage_line(label: str, e: StageEstimate, spec: ProviderSpec) -> str:
    return (
        f"  {label} {e.rows} rows, {e.distinct} distinct texts, {e.cached} already paid for (cache), "
        f"{e.truncated} cut to the model's limit; ~{e.tokens:,} tokens in {e.requests} requests "
        f"({spec.provider} {spec.model})"
    )


def _batch_limits(spec: ProviderSpec) -> str:
    b = spec.batch
    return (
        f"{'OpenAI Batch API' if spec.provider == 'openai' else 'Gemini batch mode'}: at most "
        f"{b.max_requests:,} requests, {b.max_inputs:,} inputs and {b.max_megabytes:g} MB per batch"
        f"{', 20 MB inline' if spec.provider == 'gemini' else ''}; one text per request line; waits up to "
        f"{b.wait_minutes:g} min per run"
    )


def _minutes(requests: int, tokens: int, limit: RateLimitSpec) -> float:
    bounds = [0.0]
    if limit.requests_per_minute:
        bounds.append(requests / limit.requests_per_minute)
    if limit.tokens_per_minute:
        bounds.append(tokens / limit.tokens_per_minute)
    return max(bounds)


def _key(spec: ProviderSpec) -> str:
    env = spec.resolved_api_key_env
    return (os.environ.get(env) if env else None) or PLACEHOLDER_KEY


def estimate(
    provider: EmbeddingProvider | EnrichmentProvider,
    texts: list[str],
    spec: EmbeddingSpec | EnrichmentSpec,
    make_cache: Callable[[], ResultCache],
) -> StageEstimate:
    """What the engine would send for ``texts`` in one partition's run. The cache is opened in the event
    loop that reads it (a Redis client belongs to the loop it was made in)."""
    sent, tokens, truncated = provider.prepare(texts)
    if isinstance(provider, EmbeddingProvider):
        keys = [embedding_key(provider.name, provider.model, provider.dimension, t) for t in sent]
    else:
        keys = [enrichment_key(provider.name, provider.model, t) for t in sent]
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)

    async def look_up() -> dict[str, bytes]:
        cache = make_cache()
        try:
            return await cache.get_many(sorted(first))
        finally:
            await cache.aclose()

    cached = asyncio.run(look_up()) if first else {}
    todo = [i for k, i in first.items() if k not in cached]
    paid = sum(tokens[i] for i in todo)
    if spec.mode == "batch":  # one text per request line, lines grouped within the batch limits
        lines = [[i] for i in todo]
        grouped = plan_batches(lines, provider.batch_api(), [len(t.encode()) for t in sent], spec.batch)
        return StageEstimate(len(texts), len(first), len(first) - len(todo), truncated, paid, len(lines), len(grouped))
    size = min(spec.batch_size, provider.max_batch_size)
    requests = batches(todo, tokens, size, getattr(provider, "max_batch_tokens", None))
    return StageEstimate(len(texts), len(first), len(first) - len(todo), truncated, paid, len(requests))


def _cache(dataset: DatasetConfig, spec: ProviderSpec, ledger: Ledger, ready: bool) -> Callable[[], ResultCache]:
    return (lambda: build_policy(dataset, spec, ledger).cache) if ready else NullCache


def plan_dataset(
    name: str,
    dataset: DatasetConfig,
    *,
    force: bool = False,
    keys: list[str] | None = None,
    limit: int | None = None,
    exact: bool = False,
) -> Plan:
    """Detect the rows of the dataset (or of ``keys``) as a run would, and add up what it would send;
    ``limit`` caps the rows needing work over the whole plan, partitions in order. The database counts
    the rows and only those needing work are read, unless ``exact`` (or ``force``) reads every row."""
    plan = Plan(name, dataset)
    emb_spec: EmbeddingSpec = dataset.embedding
    enr_spec: EnrichmentSpec = dataset.enrichment
    embedder = build_embedding_provider(emb_spec, _key(emb_spec))
    enricher = build_enrichment_provider(enr_spec, _key(enr_spec)) if enr_spec.enabled else None
    with open_store(name, dataset) as store:
        plan.missing = store.missing_columns()
        ledger_ready = not store.ledger.missing_tables()
        if not plan.missing:
            store.rows.check_columns()
        emb_cache = _cache(dataset, emb_spec, store.ledger, ledger_ready)
        enr_cache = _cache(dataset, enr_spec, store.ledger, ledger_ready) if enricher else NullCache
        remaining = limit
        all_keys = keys if keys is not None else [k for k, _ in partition_activity(store.rows, dataset)]
        # counted by the database, with only the rows needing work read (unless told to read everything)
        reading = None if force or exact or plan.missing or not ledger_ready else read_pending(store, dataset, all_keys)
        for key in all_keys:
            if remaining is not None and remaining <= 0:
                break
            if reading is not None:
                detected = reading.detected_rows(key)
                unread = reading.coverage(key).reasons
                if detected is not None:
                    unread.subtract(detected.column("reason").to_pylist())
                plan.reasons.update(+unread)
                if detected is None:
                    plan.work_by_partition[key] = 0
                    continue
            else:
                part = partition_spec(key, dataset, store.rows)
                raw = store.rows.read_partition(part, dataset.read_batch_size)
                ids = raw.column("id").to_pylist()
                cooling = store.ledger.cooling_down_ids(ids, dataset.failure_cooldown_hours) if ledger_ready else set()
                detected = detect(raw, dataset, force=force, cooling_ids=cooling)
            if remaining is not None:
                detected = apply_limit(detected, remaining)
            plan.reasons.update(detected.column("reason").to_pylist())
            texts = detected.column("text").to_pylist()
            needs_emb = detected.column("needs_embedding").to_pylist()
            needs_enr = detected.column("needs_enrichment").to_pylist()
            work = sum(1 for e, n in zip(needs_emb, needs_enr, strict=True) if e or n)
            plan.work_by_partition[key] = work
            if remaining is not None:
                remaining -= work
            # the texts as sent before enrichment; with include_enrichment the embedded text grows a little
            chosen = [t or "" for t, e in zip(texts, needs_emb, strict=True) if e]
            plan.embedding.add(estimate(embedder, chosen, emb_spec, emb_cache))
            if enricher is not None:
                chosen = [t or "" for t, n in zip(texts, needs_enr, strict=True) if n]
                plan.enrichment.add(estimate(enricher, chosen, enr_spec, enr_cache))
    return plan
