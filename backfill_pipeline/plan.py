"""The dry run: what needs work and what it would cost, without calling a provider or writing a row."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from .config import DatasetConfig, RateLimitSpec
from .detection import detect
from .partitions import partition_activity, partition_spec
from .stores import open_store

CHARS_PER_TOKEN = 4  # an estimate: exact counts need the provider's tokenizer, and a plan must be cheap


@dataclass
class Plan:
    name: str
    dataset: DatasetConfig
    reasons: Counter = field(default_factory=Counter)
    rows_embed: int = 0
    rows_enrich: int = 0
    chars_embed: int = 0
    chars_enrich: int = 0

    @property
    def rows(self) -> int:
        return sum(self.reasons.values())

    @property
    def tokens_embed(self) -> int:
        return self.chars_embed // CHARS_PER_TOKEN

    @property
    def tokens_enrich(self) -> int:
        return self.chars_enrich // CHARS_PER_TOKEN

    @property
    def requests_embed(self) -> int:
        return math.ceil(self.rows_embed / self.dataset.embedding.batch_size) if self.rows_embed else 0

    @property
    def requests_enrich(self) -> int:
        enr = self.dataset.enrichment
        return self.rows_enrich if enr.provider != "offline" else math.ceil(self.rows_enrich / enr.batch_size)

    @property
    def cost(self) -> float:
        emb, enr = self.dataset.embedding, self.dataset.enrichment
        output_tokens = self.rows_enrich * enr.expected_output_tokens
        return (
            self.tokens_embed / 1e6 * emb.price_per_million_input_tokens
            + self.tokens_enrich / 1e6 * enr.price_per_million_input_tokens
            + output_tokens / 1e6 * enr.price_per_million_output_tokens
        )

    @property
    def minutes(self) -> float:
        emb, enr = self.dataset.embedding, self.dataset.enrichment
        return max(
            _minutes(self.requests_embed, self.tokens_embed, emb.rate_limit),
            _minutes(self.requests_enrich, self.tokens_enrich, enr.rate_limit),
        )

    def as_dict(self) -> dict[str, object]:
        emb, enr = self.dataset.embedding, self.dataset.enrichment
        out: dict[str, object] = {
            "dataset": self.name,
            "rows": self.rows,
            "reasons": dict(sorted(self.reasons.items())),
            "embedding": {
                "provider": emb.provider,
                "model": emb.model,
                "rows": self.rows_embed,
                "tokens_estimated": self.tokens_embed,
                "requests": self.requests_embed,
            },
            "estimated_cost_usd": round(self.cost, 6),
            "minimum_minutes": round(self.minutes, 2),
        }
        if enr.enabled:
            out["enrichment"] = {
                "provider": enr.provider,
                "model": enr.model,
                "rows": self.rows_enrich,
                "tokens_in_estimated": self.tokens_enrich,
                "requests": self.requests_enrich,
            }
        return out

    def lines(self) -> list[str]:
        emb, enr = self.dataset.embedding, self.dataset.enrichment
        out = [f"{self.name}: {self.rows} rows"]
        out += [f"  {reason:<24} {count}" for reason, count in sorted(self.reasons.items())]
        out.append(
            f"  embedding:  {self.rows_embed} rows, ~{self.tokens_embed:,} tokens, {self.requests_embed} requests "
            f"({emb.provider} {emb.model})"
        )
        if enr.enabled:
            out.append(
                f"  enrichment: {self.rows_enrich} rows, ~{self.tokens_enrich:,} tokens in, "
                f"{self.requests_enrich} requests ({enr.provider} {enr.model})"
            )
        out.append(
            f"  estimated cost ${self.cost:.4f} at configured prices; at least {self.minutes:.1f} min at "
            "configured limits"
        )
        return out


def _minutes(requests: int, tokens: int, limit: RateLimitSpec) -> float:
    bounds = [0.0]
    if limit.requests_per_minute:
        bounds.append(requests / limit.requests_per_minute)
    if limit.tokens_per_minute:
        bounds.append(tokens / limit.tokens_per_minute)
    return max(bounds)


def plan_dataset(name: str, dataset: DatasetConfig, *, force: bool = False, keys: list[str] | None = None) -> Plan:
    """Detect every row of the dataset (or of ``keys``) as a run would, and add up what it would send."""
    plan = Plan(name, dataset)
    with open_store(name, dataset) as store:
        store.check_schema()
        for key in keys if keys is not None else [k for k, _ in partition_activity(store.rows, dataset)]:
            raw = store.rows.read_partition(partition_spec(key, dataset, store.rows), dataset.read_batch_size)
            cooling = store.ledger.cooling_down_ids(raw.column("id").to_pylist(), dataset.failure_cooldown_hours)
            detected = detect(raw, dataset, force=force, cooling_ids=cooling)
            plan.reasons.update(detected.column("reason").to_pylist())
            for text, emb, enr in zip(
                detected.column("text").to_pylist(),
                detected.column("needs_embedding").to_pylist(),
                detected.column("needs_enrichment").to_pylist(),
                strict=True,
            ):
                plan.rows_embed += emb
                plan.rows_enrich += enr
                plan.chars_embed += len(text or "") * emb
                plan.chars_enrich += len(text or "") * enr
    return plan
