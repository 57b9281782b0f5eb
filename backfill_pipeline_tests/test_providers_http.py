"""The real OpenAI and Gemini SDKs over loopback HTTP: limits, faults, retries, preflight, accounting."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from backfill_pipeline.config import ConfigError, EmbeddingSpec, EnrichmentSpec, ProviderRetrySpec, RateLimitSpec
from backfill_pipeline.engine import CallPolicy, FatalProviderError, embed_texts, enrich_texts
from backfill_pipeline.providers import build_embedding_provider, build_enrichment_provider
from backfill_pipeline.ratelimit import LocalBudget, RateLimiter

from .fake_providers import GEMINI_KEY, OPENAI_KEY, FakeProviderServer, Fault, ModelLimits

FAST_RETRY = ProviderRetrySpec(rate_limit_base_seconds=0.05, transient_base_seconds=0.05, max_attempts=4)


@pytest.fixture
def server():
    srv = FakeProviderServer().start()
    yield srv
    srv.stop()


def openai_embedder(server, dimension: int = 256, timeout: float = 5.0, model: str = "text-embedding-3-small"):
    spec = EmbeddingSpec(
        provider="openai", model=model, dimension=dimension, base_url=server.openai_url, timeout_seconds=timeout
    )
    return build_embedding_provider(spec, OPENAI_KEY)


def run(coro):
    return asyncio.run(coro)


async def _embed(provider, texts, batch_size=2048, policy=None):
    try:
        await provider.preflight()
        return await embed_texts(provider, texts, batch_size=batch_size, policy=policy or CallPolicy(retry=FAST_RETRY))
    finally:
        await provider.aclose()


async def _enrich(provider, texts, policy=None):
    try:
        await provider.preflight()
        return await enrich_texts(provider, texts, batch_size=1, policy=policy or CallPolicy(retry=FAST_RETRY))
    finally:
        await provider.aclose()


def test_openai_batches_respect_inputs_and_tokens_limits(server) -> None:
    long_word = "backfill " * 4000  # about 4,000 tokens each
    texts = [f"short text {i}" for i in range(2500)] + [f"{i} {long_word}" for i in range(100)]
    provider = openai_embedder(server)
    outcome = run(_embed(provider, texts))
    assert outcome.ok.all() and outcome.vectors.shape == (2600, 256)
    sizes = [(n, tokens) for route, n, tokens in server.stats.inputs_per_request if route == "embeddings"]
    assert max(n for n, _ in sizes) <= 2048 and max(t for _, t in sizes) <= 300_000
    assert sum(n for n, _ in sizes) == 2600 and server.count("embeddings", 400) == 0
    assert provider.usage.input_tokens == sum(t for _, t in sizes)
    np.testing.assert_allclose(np.linalg.norm(outcome.vectors, axis=1), 1.0, rtol=1e-5)


def test_overlong_text_is_truncated_not_failed(server) -> None:
    texts = ["word " * 9000, "a short one"]
    provider = openai_embedder(server)
    outcome = run(_embed(provider, texts))
    assert outcome.ok.all() and provider.usage.truncated_inputs == 1
    assert server.count("embeddings", 400) == 0 and max(t for _, _, t in server.stats.inputs_per_request) <= 8192 + 10


def test_dimensions_and_base64_reach_the_wire(server) -> None:
    server.keep_bodies = True
    run(_embed(openai_embedder(server, dimension=512), ["hello"]))
    body = next(b for route, b in server.stats.bodies if route == "embeddings")
    assert body["dimensions"] == 512 and body["encoding_format"] == "base64"


def test_preflight_errors_come_before_any_paid_call(server, monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="no OpenAI API key"):
        build_embedding_provider(
            EmbeddingSpec(provider="openai", model="text-embedding-3-small", dimension=8, base_url=server.openai_url),
            "  ",
        )
    with pytest.raises(ConfigError, match="at most 1536 dimensions, not 2000"):
        openai_embedder(server, dimension=2000)
    with pytest.raises(ConfigError, match="'text-embedding-9' is not usable"):
        run(_embed(openai_embedder(server, model="text-embedding-9"), ["x"]))
    wrong_key = build_embedding_provider(
        EmbeddingSpec(provider="openai", model="text-embedding-3-small", dimension=8, base_url=server.openai_url),
        "sk-wrong",
    )
    with pytest.raises(ConfigError, match="refused the API key") as info:
        run(_embed(wrong_key, ["x"]))
    assert "sk-wrong" not in str(info.value)
    with pytest.raises(ConfigError, match="no Gemini API key"):
        monkeypatch.delenv("GEMINI_API_KEY", raising=False)
        monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
        build_embedding_provider(EmbeddingSpec(provider="gemini", model="gemini-embedding-001", dimension=8), None)
    assert server.count("embeddings") == 0  # not one paid request


def test_sdk_environment_variables_work(server, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", server.openai_url)
    provider = build_embedding_provider(EmbeddingSpec(provider="openai", model="text-embedding-3-small", dimension=8))
    assert run(_embed(provider, ["via the environment"])).ok.all()
    monkeypatch.setenv("GEMINI_API_KEY", GEMINI_KEY)
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", server.gemini_url)
    gemini = build_embedding_provider(EmbeddingSpec(provider="gemini", model="gemini-embedding-001", dimension=8))
    assert run(_embed(gemini, ["via the environment"])).ok.all()


def test_gemini_embeddings_batches_of_100_with_dimensionality_and_task(server) -> None:
    server.keep_bodies = True
    spec = EmbeddingSpec(
        provider="gemini",
        model="gemini-embedding-001",
        dimension=768,
        base_url=server.gemini_url,
        task_type="RETRIEVAL_DOCUMENT",
    )
    provider = build_embedding_provider(spec, GEMINI_KEY)
    outcome = run(_embed(provider, [f"document {i}" for i in range(250)], batch_size=256))
    assert outcome.ok.all() and outcome.vectors.shape == (250, 768)
    assert sorted(n for route, n, _ in server.stats.inputs_per_request if route == "embeddings") == [50, 100, 100]
    request = next(b for route, b in server.stats.bodies if route == "embeddings")["requests"][0]
    assert request["outputDimensionality"] == 768 and request["taskType"] == "RETRIEVAL_DOCUMENT"


@pytest.mark.parametrize("provider_name", ["openai", "gemini"])
def test_structured_enrichment_and_invalid_answers(server, provider_name: str) -> None:
    server.keep_bodies = True
    model = "gpt-4o-mini" if provider_name == "openai" else "gemini-2.0-flash"
    url = server.openai_url if provider_name == "openai" else server.gemini_url
    key = OPENAI_KEY if provider_name == "openai" else GEMINI_KEY
    provider = build_enrichment_provider(EnrichmentSpec(provider=provider_name, model=model, base_url=url), key)
    texts = [
        "Senior Data Engineer\n\nSpark, Airflow and 6+ years of SQL.",
        "FAULT:schema posting",
        "FAULT:badjson posting",
    ]
    outcome = run(_enrich(provider, texts))
    assert outcome.results[0].seniority == "senior" and {"Spark", "Airflow", "SQL"} <= set(outcome.results[0].skills)
    assert [(f.index, f.error_class) for f in outcome.failures] == [(1, "invalid_output"), (2, "invalid_output")]
    assert "seniority" in outcome.failures[0].message and "invalid JSON" in outcome.failures[1].message
    assert server.count("chat") == 3  # invalid answers are not retried in the run
    assert provider.usage.input_tokens > 0 and provider.usage.output_tokens > 0
    body = next(b for route, b in server.stats.bodies if route == "chat")
    if provider_name == "openai":
        fmt = body["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
        assert fmt["json_schema"]["schema"]["properties"]["seniority"]["enum"][0] == "intern"
    else:
        config = body["generationConfig"]
        assert config["responseMimeType"] == "application/json" and "seniority" in str(config["responseSchema"])


@pytest.mark.parametrize("kind", ["500", "503", "truncated"])
def test_transient_faults_are_retried(server, kind: str) -> None:
    server.inject("embeddings", Fault(kind, times=2))
    provider = openai_embedder(server)
    outcome = run(_embed(provider, ["a", "b", "c"]))
    assert outcome.ok.all()
    assert provider.usage.retries == 2 and provider.usage.requests == 3


def test_timeouts_are_retried(server) -> None:
    server.inject("embeddings", Fault("timeout", times=1, retry_after=1.5))
    provider = openai_embedder(server, timeout=0.5)
    outcome = run(_embed(provider, ["slow"]))
    assert outcome.ok.all() and provider.usage.retries == 1


def test_transient_faults_that_persist_fail_the_rows_not_the_partition(server) -> None:
    server.inject("embeddings", Fault("503", times=10))
    provider = openai_embedder(server)
    outcome = run(_embed(provider, ["a", "b"]))
    assert not outcome.ok.any()
    assert {(f.error_class, f.attempts) for f in outcome.failures} == {("transient", 4)}


def test_429_retry_after_is_honoured(server) -> None:
    server.inject("embeddings", Fault("429", times=1, retry_after=0.8))
    provider = openai_embedder(server)
    started = time.monotonic()
    outcome = run(_embed(provider, ["x"]))
    assert outcome.ok.all() and provider.usage.rate_limited == 1
    assert time.monotonic() - started >= 0.8 * 0.9  # waited Retry-After, not the 0.05s base


def test_gemini_429_retry_info_is_honoured(server) -> None:
    server.inject("embeddings", Fault("429", times=1, retry_after=0.6))
    spec = EmbeddingSpec(provider="gemini", model="gemini-embedding-001", dimension=16, base_url=server.gemini_url)
    provider = build_embedding_provider(spec, GEMINI_KEY)
    started = time.monotonic()
    assert run(_embed(provider, ["x"])).ok.all()
    assert provider.usage.rate_limited == 1 and time.monotonic() - started >= 0.6 * 0.9


def test_batch_rejected_as_a_whole_is_split_to_the_row(server) -> None:
    texts = [f"text {i}" for i in range(64)]
    texts[37] = "FAULT:400 text"
    provider = openai_embedder(server)
    outcome = run(_embed(provider, texts))
    assert [(f.index, f.error_class) for f in outcome.failures] == [(37, "permanent")]
    assert outcome.ok.sum() == 63


def test_rate_limit_budget_paces_requests_and_headers_slow_down(server) -> None:
    server.limits["gpt-4o-mini"] = ModelLimits(requests_per_minute=600, burst_seconds=1.0)
    provider = build_enrichment_provider(
        EnrichmentSpec(provider="openai", model="gpt-4o-mini", base_url=server.openai_url), OPENAI_KEY
    )
    limiter = RateLimiter(LocalBudget(), "t", RateLimitSpec(requests_per_minute=600), burst_seconds=0.5)
    started = time.monotonic()
    outcome = run(
        _enrich(
            provider,
            [f"posting {i}" for i in range(40)],
            CallPolicy(limiter=limiter, retry=FAST_RETRY, max_in_flight=16),
        )
    )
    elapsed = time.monotonic() - started
    assert all(outcome.results) and server.count("chat", 429) == 0
    assert elapsed >= (40 - 10) / 10 * 0.9  # 10 requests/s after the burst


def test_fatal_errors_stop_the_run(server) -> None:
    provider = openai_embedder(server)

    async def go():
        try:
            server.models.discard("text-embedding-3-small")  # withdrawn after the preflight
            return await embed_texts(provider, ["a"], batch_size=8, policy=CallPolicy(retry=FAST_RETRY))
        finally:
            await provider.aclose()

    with pytest.raises(FatalProviderError, match="not found"):
        run(go())
