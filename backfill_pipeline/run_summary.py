"""What a CLI run did, over all its partitions: rows by outcome, requests, tokens, cache hits and cost.

Each partition's figures come from the metadata of its run's materializations, so the summary says
exactly what the Dagster UI shows per partition, added up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

PAID = ("requests", "input_tokens", "output_tokens", "cache_hits", "rate_limited", "cost_usd")

# asset -> {metadata key: summary key}; keys given twice are added up
FIGURES = {
    "written_table": {
        "rows_written": "rows_written",
        "rows_up_to_date": "rows_up_to_date",
        "rows_skipped_no_text": "rows_without_text",
        "rows_cooling_down": "rows_cooling_down",
        "rows_deferred": "rows_deferred",
        "rows_enrichment_failed": "rows_failed_enrichment",
        "rows_embedding_failed": "rows_failed_embedding",
        "rows_write_rejected": "rows_failed_write",
    },
    "llm_enrichment": {
        **{f"provider_{k}": f"enrichment_{k}" for k in PAID},
        # embeddings sent alongside the enrichment (see embed_ahead): the embedding stage's, found by the
        # embeddings step as cache hits
        **{f"embedding_ahead_{k}": f"embedding_{k}" for k in PAID if k != "cache_hits"},
        "embedding_ahead_rows": "embedding_ahead_rows",
    },
    "embeddings": {f"provider_{k}": f"embedding_{k}" for k in PAID},
}


def partition_figures(metadata_by_asset: dict[str, dict[str, object]]) -> dict[str, float]:
    """The summary's figures from one run's materialization metadata (asset name -> plain values)."""
    out: dict[str, float] = {}
    for asset, keys in FIGURES.items():
        values = metadata_by_asset.get(asset, {})
        for key, name in keys.items():
            value = values.get(key)
            if isinstance(value, int | float):
                out[name] = out.get(name, 0) + value
    return out


def failed_rows(figures: Mapping[str, float]) -> int:
    return int(sum(v for k, v in figures.items() if k.startswith("rows_failed_")))


@dataclass
class RunSummary:
    seconds: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)
    totals: Counter[str] = field(default_factory=Counter)

    def add(self, status: str, figures: dict[str, float]) -> None:
        self.statuses[status.split(" ")[0]] += 1
        self.totals.update(figures)

    def as_dict(self) -> dict[str, object]:
        totals = {k: round(v, 6) if isinstance(v, float) else v for k, v in sorted(self.totals.items())}
        written = self.totals.get("rows_written", 0)
        return {
            "partitions": dict(self.statuses),
            "seconds": round(self.seconds, 1),
            "rows_written_per_second": round(written / self.seconds, 1) if self.seconds else 0.0,
            "rows_failed": failed_rows(self.totals),
            **totals,
        }

    def lines(self) -> list[str]:
        t = self.totals
        parts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(self.statuses.items()))
        out = [f"summary: {sum(self.statuses.values())} partitions ({parts}) in {self.seconds:.1f}s"]
        out.append(
            f"  rows: {int(t['rows_written']):,} written, {int(t['rows_up_to_date']):,} up to date, "
            f"{int(t['rows_without_text']):,} without text, {failed_rows(t):,} failed (enrichment "
            f"{int(t['rows_failed_enrichment'])}, embedding {int(t['rows_failed_embedding'])}, write "
            f"{int(t['rows_failed_write'])}), {int(t['rows_cooling_down']):,} cooling down after earlier failures"
        )
        for stage in ("enrichment", "embedding"):
            if t[f"{stage}_requests"] or t[f"{stage}_cache_hits"]:
                out.append(
                    f"  {stage}: {int(t[f'{stage}_requests']):,} requests, {int(t[f'{stage}_input_tokens']):,} "
                    f"tokens in, {int(t[f'{stage}_output_tokens']):,} out, {int(t[f'{stage}_cache_hits']):,} "
                    f"cache hits{_ahead(t) if stage == 'embedding' else ''}, {int(t[f'{stage}_rate_limited'])} "
                    f"rate-limited, ${t[f'{stage}_cost_usd']:.4f}"
                )
        if self.seconds:
            out.append(f"  rate: {t['rows_written'] / self.seconds:,.1f} rows written per second")
        return out


def _ahead(totals: Mapping[str, float]) -> str:
    rows = int(totals["embedding_ahead_rows"])
    return f" ({rows:,} of them embedded during the enrichment)" if rows else ""
