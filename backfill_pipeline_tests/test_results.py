"""The tables between steps, as plain functions: what the write receives for each outcome of each stage."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from backfill_pipeline.config import parse_config
from backfill_pipeline.engine import EmbedOutcome, EnrichOutcome, RowFailure
from backfill_pipeline.providers.base import Enrichment
from backfill_pipeline.results import embeddings_table, enrichment_table, merge_results
from backfill_pipeline.rows import enrichment_col

DIM = 4


def _dataset():
    data = {
        "database_url": "sqlite:///x.db",
        "table": "t",
        "text": {"columns": ["body"]},
        "embedding": {"dimension": DIM, "model": "emb-1"},
        "enrichment": {"enabled": True, "model": "llm-1"},
    }
    return parse_config({"datasets": {"t": data}}).datasets["t"]


def test_a_failed_enrichment_leaves_the_fresh_embedding_hashed_and_its_own_hash_empty() -> None:
    """Row 1 is embedded and enriched; row 2 is embedded but its enrichment failed. Row 2 gets its embedding's
    content hash (so a later edit of its text is seen) and an empty enrichment hash (so its enrichment is
    redone, whatever it held before)."""
    dataset = _dataset()
    todo = pa.table({"id": [1, 2], "content_hash": ["h1", "h2"], "text": ["a", "b"]})
    vectors = np.ones((2, DIM), dtype=np.float32)
    embeddings = embeddings_table(dataset, todo, EmbedOutcome(vectors, np.array([True, True])))
    answer = Enrichment(skills=["SQL"], seniority="mid", summary="Writes SQL.")
    enrichment = enrichment_table(
        dataset, todo, EnrichOutcome([answer, None], [RowFailure(1, "invalid_output", "bad answer")])
    )
    merged = merge_results(dataset, enrichment, embeddings).to_pylist()
    assert [r["id"] for r in merged] == [1, 2]
    assert [r["content_hash"] for r in merged] == ["h1", "h2"]
    assert [r["model"] for r in merged] == ["emb-1", "emb-1"]
    assert [r["enrichment_hash"] for r in merged] == ["h1", ""]
    assert [r["enrichment_model"] for r in merged] == ["llm-1", None]
    assert merged[0][enrichment_col("summary")] == "Writes SQL." and merged[1][enrichment_col("summary")] is None
