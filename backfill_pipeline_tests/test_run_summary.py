"""The CLI's summary adds up what each partition's materializations say, including the embeddings that went
ahead during the enrichment (paid in the enrichment step, found by the embeddings step in the cache)."""

from __future__ import annotations

from backfill_pipeline.run_summary import RunSummary, partition_figures


def _partition(ahead_requests: int, ahead_rows: int, step_requests: int, hits: int) -> dict[str, float]:
    return partition_figures(
        {
            "llm_enrichment": {
                "provider_requests": 40,
                "provider_cost_usd": 0.5,
                "embedding_ahead_requests": ahead_requests,
                "embedding_ahead_cost_usd": 0.25,
                "embedding_ahead_rows": ahead_rows,
                "embedding_ahead_cache_hits": 7,  # the enrichment step's own look-ups: not the stage's hits
            },
            "embeddings": {"provider_requests": step_requests, "provider_cost_usd": 0.125, "provider_cache_hits": hits},
            "written_table": {"rows_written": 40},
        }
    )


def test_embeddings_paid_ahead_count_with_the_embedding_stage() -> None:
    one = _partition(ahead_requests=3, ahead_rows=30, step_requests=1, hits=30)
    assert one["embedding_requests"] == 4 and one["embedding_cost_usd"] == 0.375
    assert one["embedding_cache_hits"] == 30 and one["enrichment_requests"] == 40

    summary = RunSummary(seconds=2.0)
    summary.add("ok", one)
    summary.add("ok", _partition(ahead_requests=0, ahead_rows=0, step_requests=0, hits=40))  # all cached before
    [embedding] = [line for line in summary.lines() if line.startswith("  embedding:")]
    assert embedding == (
        "  embedding: 4 requests, 0 tokens in, 0 out, 70 cache hits (30 of them embedded during the enrichment), "
        "0 rate-limited, $0.7500"
    )
