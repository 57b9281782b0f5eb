"""The offline providers: deterministic, normalised, lexically honest; rules that find skills and levels."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from backfill_pipeline.config import ConfigError
from backfill_pipeline.engine import embed_texts
from backfill_pipeline.providers.base import Enrichment
from backfill_pipeline.providers.offline_embedding import OfflineEmbeddingProvider, hashed_ngram_vectors
from backfill_pipeline.providers.offline_enrichment import (
    OfflineEnrichmentProvider,
    extract_skills,
    extractive_summary,
    infer_seniority,
)

from .conftest import SHARED


def test_embeddings_are_deterministic_normalised_any_dimension() -> None:
    texts = ["Senior Python developer", "Pastry chef", ""]
    for dim in (3, 384, 768, 1536):
        a = hashed_ngram_vectors(texts, dim)
        b = hashed_ngram_vectors(list(reversed(texts)), dim)[::-1]
        assert a.shape == (3, dim) and a.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(a, b)  # a text's vector does not depend on its batch


def test_embeddings_capture_lexical_similarity() -> None:
    query, near, far = hashed_ngram_vectors(
        [
            "Senior Python backend engineer, Django and PostgreSQL",
            "Python engineer (senior) for our Django / Postgres backend",
            "Pastry chef wanted for a French bakery, early mornings",
        ],
        768,
    )
    assert query @ near > 0.3
    assert abs(query @ far) < 0.15
    assert query @ near > 3 * abs(query @ far)


def test_provider_counts_requests() -> None:
    provider = OfflineEmbeddingProvider(dimension=16)
    outcome = asyncio.run(embed_texts(provider, ["a", "b", "a"], batch_size=10))
    assert outcome.ok.all() and (outcome.vectors[0] == outcome.vectors[2]).all()
    assert (provider.usage.requests, provider.usage.inputs) == (1, 2)  # the repeated text is sent once


def test_enrichment_rules() -> None:
    text = (
        "Senior Data Engineer at Acme\n\nWe are looking for a data engineer to build pipelines with Python, "
        "Spark and Airflow on AWS. You need 6+ years of experience with SQL and Kubernetes."
    )
    skills = extract_skills(text)
    assert {"Python", "Spark", "Airflow", "AWS", "SQL", "Kubernetes"} <= set(skills)
    assert infer_seniority("Senior Data Engineer at Acme", text) == "senior"
    assert infer_seniority("Data Engineer", "needs 1 year of experience") == "junior"
    assert infer_seniority("Head of Sales", "") == "executive"
    assert "looking for a data engineer" in extractive_summary(text)
    answer = asyncio.run(OfflineEnrichmentProvider().enrich([text]))[0]
    assert Enrichment.model_validate(answer).seniority == "senior"


@pytest.mark.skipif(not (SHARED / "data/skillspan/postings.jsonl").exists(), reason="../shared data absent")
def test_enrichment_against_skillspan_labels() -> None:
    rows = [json.loads(line) for line in (SHARED / "data/skillspan/postings.jsonl").open()]
    answers = asyncio.run(OfflineEnrichmentProvider().enrich([r["text"] for r in rows]))
    # labels list one or more levels ("Mid-Level Senior"); a prediction among them counts as right
    levels = {"junior": "junior", "mid-level": "mid", "senior": "senior", "lead": "lead", "manager": "lead"}
    labelled = correct = 0
    for row, answer in zip(rows, answers, strict=True):
        lines = row["text"].split("\n")
        if "Experience level:" in lines:
            words = lines[lines.index("Experience level:") + 1].strip().lower().split()
            accepted = {levels[w] for w in words if w in levels}
            if accepted:
                labelled += 1
                correct += answer["seniority"] in accepted
    assert labelled >= 50
    assert correct / labelled > 0.8
    assert all(Enrichment.model_validate(a) for a in answers)


def test_the_local_embedder_finds_meaning_offline(monkeypatch) -> None:
    """WordLlama from the wheel: semantic (a query is nearer a related posting than an unrelated one,
    with no words in common to help), any Matryoshka size up to 256, and never a network call."""
    import socket

    from backfill_pipeline.config import EmbeddingSpec
    from backfill_pipeline.providers import build_embedding_provider
    from backfill_pipeline.providers.local_embedding import _model

    def no_network(*args, **kwargs):
        raise AssertionError("the local embedder tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    _model.cache_clear()
    provider = build_embedding_provider(EmbeddingSpec(provider="local", dimension=256))
    assert provider.model == "wordllama-l2-supercat"
    query, related, unrelated = (
        "software engineer job",
        "Senior Python developer building backends",
        "Nurse for night shifts",
    )
    vectors = asyncio.run(provider.embed([query, related, unrelated]))
    assert vectors.shape == (3, 256) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.05
    small = asyncio.run(build_embedding_provider(EmbeddingSpec(provider="local", dimension=64)).embed([query]))
    assert small.shape == (1, 64)
    with pytest.raises(ConfigError, match="at most 256 dimensions"):
        build_embedding_provider(EmbeddingSpec(provider="local", dimension=768))
