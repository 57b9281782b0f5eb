"""Google Gemini through the official ``google-genai`` SDK.

Embeddings with ``embed_content`` (``batchEmbedContents``: at most 100 inputs per call),
``output_dimensionality`` and ``task_type``; enrichment with ``generate_content`` and a response schema.
The SDK does not retry by default (good: the engine retries by class and counts every attempt) and talks
API version ``v1`` unless told otherwise; this provider asks for ``v1beta``, where output dimensionality
and response schemas are served. ``GEMINI_API_KEY``/``GOOGLE_API_KEY`` and ``GOOGLE_GEMINI_BASE_URL`` work.
"""

from __future__ import annotations

import json
import os

import numpy as np
from google import genai
from google.genai import errors, types

from ..config import ConfigError, EmbeddingSpec, EnrichmentSpec
from ..ratelimit import parse_reset
from .base import EmbeddingProvider, EnrichmentProvider, ProviderError, enrichment_json_schema
from .batch_api import BatchAPI
from .openai_provider import SYSTEM_PROMPT

MAX_INPUTS = 100
MAX_INPUT_TOKENS = 2048
CHARS_PER_TOKEN = 4  # the SDK's token counting is a paid round trip; this estimate sizes budgets only
EMBEDDING_MODELS = {"gemini-embedding-001": 3072, "text-embedding-004": 768}
API_VERSION = "v1beta"


def _api_key(explicit: str | None) -> str:
    key = (explicit or os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY") or "").strip()
    if not key:
        raise ConfigError("no Gemini API key: set GEMINI_API_KEY or GOOGLE_API_KEY (or the variable in api_key_env)")
    return key


def _client(spec: EmbeddingSpec | EnrichmentSpec, api_key: str | None) -> genai.Client:
    options = types.HttpOptions(
        api_version=API_VERSION,
        base_url=spec.base_url or os.environ.get("GOOGLE_GEMINI_BASE_URL") or None,
        timeout=int(spec.timeout_seconds * 1000),
    )
    return genai.Client(api_key=_api_key(api_key), http_options=options)


def _retry_after(exc: errors.APIError) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None and headers.get("retry-after"):
        return parse_reset(headers.get("retry-after"))
    details = exc.details.get("error", {}).get("details", []) if isinstance(exc.details, dict) else []
    for detail in details:
        if isinstance(detail, dict) and "retryDelay" in detail:
            return parse_reset(detail["retryDelay"])
    return None


def classify(exc: Exception) -> ProviderError:
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, errors.APIError):
        message = f"HTTP {exc.code} {exc.status or ''}: {exc.message or ''}".strip()
        if exc.code == 429:
            return ProviderError(f"rate limited: {message}", "rate_limit", retry_after=_retry_after(exc))
        if exc.code in (401, 403):
            return ProviderError(f"Gemini refused the API key: {message}", "fatal")
        if exc.code == 404:
            return ProviderError(f"not found: {message}", "fatal")
        if exc.code >= 500 or exc.code in (408, 409):
            return ProviderError(message, "transient")
        return ProviderError(message, "permanent")
    name = type(exc).__name__
    return ProviderError(f"{name}: {exc}", "transient")  # timeouts, connection errors, truncated bodies


def _truncate(texts: list[str]) -> tuple[list[str], list[int], int]:
    limit = MAX_INPUT_TOKENS * CHARS_PER_TOKEN
    out = [t[:limit] for t in texts]
    truncated = sum(len(t) > limit for t in texts)
    return out, [max(1, len(t) // CHARS_PER_TOKEN) for t in out], truncated


class GeminiEmbeddingProvider(EmbeddingProvider):
    name = "gemini"
    max_batch_size = MAX_INPUTS

    def __init__(self, spec: EmbeddingSpec, api_key: str | None):
        super().__init__()
        self.model, self.dimension, self.task_type = spec.model, spec.dimension, spec.task_type
        largest = EMBEDDING_MODELS.get(spec.model)
        if largest is not None and spec.dimension > largest:
            raise ConfigError(f"{spec.model} gives at most {largest} dimensions, not {spec.dimension}")
        self.client = _client(spec, api_key)

    def prepare(self, texts: list[str], exact: bool = True) -> tuple[list[str], list[int], int]:
        return _truncate(texts)

    async def preflight(self) -> None:
        try:
            await self.client.aio.models.get(model=self.model)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"Gemini embedding model {self.model!r} is not usable: {classify(exc)}") from None

    async def embed(self, texts: list[str]) -> np.ndarray:
        config = types.EmbedContentConfig(output_dimensionality=self.dimension, task_type=self.task_type)
        try:
            response = await self.client.aio.models.embed_content(model=self.model, contents=texts, config=config)
        except Exception as exc:  # noqa: BLE001
            raise classify(exc) from None
        embeddings = response.embeddings or []
        if len(embeddings) != len(texts):
            raise ProviderError(f"asked for {len(texts)} embeddings, got {len(embeddings)}", "invalid_output")
        self.usage.input_tokens += sum(_truncate(texts)[1])
        return np.asarray([e.values for e in embeddings], dtype=np.float32)

    def batch_api(self) -> BatchAPI:
        from .gemini_batch import GeminiBatches

        return GeminiBatches(self, embeddings=True)

    async def aclose(self) -> None:
        await self.client.aio.aclose()


class GeminiEnrichmentProvider(EnrichmentProvider):
    name = "gemini"
    max_batch_size = 1

    def __init__(self, spec: EnrichmentSpec, api_key: str | None):
        super().__init__()
        self.model = spec.model
        self.client = _client(spec, api_key)
        schema = enrichment_json_schema()
        schema.pop("additionalProperties", None)  # not part of Gemini's schema dialect
        self.config = types.GenerateContentConfig(
            system_instruction=SYSTEM_PROMPT, response_mime_type="application/json", response_schema=schema
        )

    def prepare(self, texts: list[str], exact: bool = True) -> tuple[list[str], list[int], int]:
        out = [t[:400_000] for t in texts]
        return out, [len(t) // CHARS_PER_TOKEN + 60 for t in out], sum(len(t) > 400_000 for t in texts)

    async def preflight(self) -> None:
        try:
            await self.client.aio.models.get(model=self.model)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"Gemini model {self.model!r} is not usable: {classify(exc)}") from None

    async def enrich(self, texts: list[str]) -> list[dict | Exception]:
        return [await self._one(text) for text in texts]

    def batch_api(self) -> BatchAPI:
        from .gemini_batch import GeminiBatches

        return GeminiBatches(self, embeddings=False)

    async def _one(self, text: str) -> dict | Exception:
        try:
            response = await self.client.aio.models.generate_content(
                model=self.model, contents=text, config=self.config
            )
        except Exception as exc:  # noqa: BLE001
            raise classify(exc) from None
        usage = response.usage_metadata
        if usage is not None:
            self.usage.input_tokens += usage.prompt_token_count or 0
            self.usage.output_tokens += usage.candidates_token_count or 0
        try:
            return json.loads(response.text or "")
        except json.JSONDecodeError as exc:
            return ProviderError(f"invalid JSON in LLM response: {exc}", "invalid_output")

    async def aclose(self) -> None:
        await self.client.aio.aclose()
