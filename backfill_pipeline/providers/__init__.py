"""Provider construction from a dataset's config; the key comes from the environment via a resource."""

from __future__ import annotations

import os

from ..config import ConfigError, EmbeddingSpec, EnrichmentSpec, ProviderSpec
from .base import EmbeddingProvider, EnrichmentProvider
from .offline_embedding import OfflineEmbeddingProvider
from .offline_enrichment import OfflineEnrichmentProvider

DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "gemini": "GEMINI_API_KEY"}


def api_key_from(env: str | None, default_env: str | None, setting: str) -> str | None:
    """The key in variable ``env``, or None to let the provider look in its SDK's usual variables (when
    ``env`` is the SDK's own); a variable named in the config and unset is an error naming the key."""
    if not env:
        return None
    value = os.environ.get(env, "").strip()
    if not value and env != default_env:
        raise ConfigError(f"no API key: environment variable {env} ({setting}) is not set")
    return value or None


def read_api_key(spec: ProviderSpec, stage: str) -> str | None:
    """A provider's key as the runs read it (see ``ProviderKeyResource``), outside Dagster."""
    env = None if spec.provider in ("offline", "local") else spec.resolved_api_key_env
    return api_key_from(env, DEFAULT_KEY_ENV.get(spec.provider), f"{stage}.api_key_env")


def build_embedding_provider(spec: EmbeddingSpec, api_key: str | None = None) -> EmbeddingProvider:
    if spec.provider == "offline":
        return OfflineEmbeddingProvider(model=spec.model, dimension=spec.dimension)
    if spec.provider == "local":
        from .local_embedding import LocalEmbeddingProvider

        return LocalEmbeddingProvider(spec.model, spec.dimension)
    if spec.provider == "openai":
        from .openai_provider import OpenAIEmbeddingProvider

        return OpenAIEmbeddingProvider(spec, api_key)
    if spec.provider == "gemini":
        from .gemini_provider import GeminiEmbeddingProvider

        return GeminiEmbeddingProvider(spec, api_key)
    raise ConfigError(f"unknown embedding provider {spec.provider!r}")


def build_enrichment_provider(spec: EnrichmentSpec, api_key: str | None = None) -> EnrichmentProvider:
    if spec.provider == "offline":
        return OfflineEnrichmentProvider(model=spec.model)
    if spec.provider == "openai":
        from .openai_provider import OpenAIEnrichmentProvider

        return OpenAIEnrichmentProvider(spec, api_key)
    if spec.provider == "gemini":
        from .gemini_provider import GeminiEnrichmentProvider

        return GeminiEnrichmentProvider(spec, api_key)
    raise ConfigError(f"unknown enrichment provider {spec.provider!r}")


def warm_up(spec: EmbeddingSpec | EnrichmentSpec) -> None:
    """Load what a provider builds once per process (its SDK), e.g. before forking workers. The tokenizer only
    for chat, which counts every text (0.1 s a worker otherwise, on the way to its first request): embeddings
    need it only for texts longer than the model's limit."""
    if spec.provider == "openai":
        if isinstance(spec, EnrichmentSpec) and spec.enabled:
            from .openai_provider import tokenizer

            tokenizer(spec.model)
        import anyio._backends._asyncio  # noqa: F401 - loaded by the first request otherwise
        from openai import AsyncOpenAI

        from .openai_provider import tls_context

        # its HTTP transport's modules, the TLS context every client shares, and the resources the SDK loads
        # on first use (the chat completions' modules take 20 ms)
        client = AsyncOpenAI(api_key="warm-up", base_url="http://127.0.0.1:9")
        tls_context()
        _ = client.chat.completions, client.embeddings, client.models
    if spec.provider == "gemini":
        from . import gemini_provider  # noqa: F401
    if spec.provider == "local" and isinstance(spec, EmbeddingSpec):
        build_embedding_provider(spec).warm_up()  # type: ignore[attr-defined]


__all__ = ["api_key_from", "build_embedding_provider", "build_enrichment_provider", "read_api_key", "warm_up"]
