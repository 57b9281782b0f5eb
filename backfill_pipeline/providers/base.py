"""The provider interface every embedding and enrichment provider implements.

Calls take batches and are coroutines, so the engine can keep many requests in flight against a
remote API; offline providers simply compute in place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..redact import mask_secrets

if TYPE_CHECKING:
    from ..ratelimit import RateSignals
    from .batch_api import BatchAPI

SENIORITY_LEVELS = ("intern", "junior", "mid", "senior", "lead", "executive")
Seniority = Literal["intern", "junior", "mid", "senior", "lead", "executive"]


class Enrichment(BaseModel):
    """The schema an LLM's answer must satisfy before anything is written."""

    model_config = ConfigDict(extra="forbid")

    skills: list[str] = Field(default_factory=list, max_length=60)
    seniority: Seniority
    summary: str = Field(min_length=1, max_length=2000)

    @field_validator("skills", "seniority", "summary", mode="before")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        """NUL is no character a text column holds (Postgres rejects the whole batch): drop it from answers."""
        if isinstance(value, str):
            return value.replace("\x00", "")
        if isinstance(value, list):
            return [v.replace("\x00", "") if isinstance(v, str) else v for v in value]
        return value

    @field_validator("skills")
    @classmethod
    def _clean_skills(cls, value: list[str]) -> list[str]:
        cleaned = [s.strip() for s in value]
        if any(not s or len(s) > 100 for s in cleaned):
            raise ValueError("each skill must be a non-empty string of at most 100 characters")
        return list(dict.fromkeys(cleaned))

    @field_validator("seniority", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value


def enrichment_json_schema() -> dict:
    """A strict JSON schema for structured-output APIs (all fields required, no extras)."""
    return {
        "type": "object",
        "properties": {
            "skills": {"type": "array", "items": {"type": "string"}},
            "seniority": {"type": "string", "enum": list(SENIORITY_LEVELS)},
            "summary": {"type": "string"},
        },
        "required": ["skills", "seniority", "summary"],
        "additionalProperties": False,
    }


@dataclass
class Usage:
    """What a provider was asked and answered, for accounting."""

    requests: int = 0
    inputs: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    rate_limited: int = 0
    retries: int = 0
    truncated_inputs: int = 0
    cache_hits: int = 0
    tokens_counted_here: int = 0  # input tokens the server did not report, counted with the tokenizer

    def cost(self, price_in_per_million: float, price_out_per_million: float) -> float:
        return self.input_tokens / 1e6 * price_in_per_million + self.output_tokens / 1e6 * price_out_per_million


class ProviderError(Exception):
    """A failure a provider reports for a batch or a row; ``kind`` says how the engine treats it:

        ``rate_limit`` (429: back off, honour ``retry_after``), ``transient`` (5xx, timeouts, broken bodies:
        back off and retry), ``permanent`` (400s: record the row, split a batch to find it), ``invalid_output``
        (unparseable or schema-violating answer: record, retry on a later run), ``unreadable_answer`` (a 200
    whose body as a whole cannot be used, such as embeddings in an unknown encoding: record every row of the
    request with the server's words, no retry, no split), ``fatal`` (bad key, unknown
        model: stop the step, retrying cannot help).
    """

    kind: str = "permanent"

    def __init__(self, message: str, kind: str | None = None, retry_after: float | None = None):
        super().__init__(mask_secrets(message))  # APIs quote keys in their errors; never keep them
        if kind:
            self.kind = kind
        self.retry_after = retry_after
        self.attempts = 1  # set by the engine when retries run out


class _Provider:
    name: str
    model: str
    max_batch_size: int = 2048
    max_batch_tokens: int | None = None
    last_signals: RateSignals | None = None  # what the last response said about the rate budget

    def __init__(self) -> None:
        self.usage = Usage()

    def prepare(self, texts: list[str], exact: bool = True) -> tuple[list[str], list[int], int]:
        """Texts as they will be sent (cut to the model's limit), their token counts, how many were cut. With
        ``exact`` false the counts may be upper bounds where a text cannot reach the limit (enough to keep
        requests within theirs; the engine's rate budget meters by :meth:`metered_tokens`)."""
        return list(texts), [max(1, len(t) // 4) for t in texts], 0

    def metered_tokens(self, texts: list[str], counted: int) -> int:
        """What one request of ``texts`` (``counted`` tokens by the tokenizer) costs in the server's rate budget,
        which providers meter in their own way."""
        return counted

    async def preflight(self) -> str | None:  # noqa: B027 - optional hook
        """Check key, model and dimension, with a free call where the server has one, before the first paid
        one; return a note for the log when it checked less (or otherwise) than that."""

    def batch_api(self) -> BatchAPI:
        """The provider's batch API, for ``mode: batch`` (the config refuses it for providers without one)."""
        raise NotImplementedError(f"provider {self.name} has no batch mode")


class EmbeddingProvider(_Provider, ABC):
    """Turns batches of texts into float32 vectors of ``dimension`` values."""

    dimension: int

    @abstractmethod
    async def embed(self, texts: list[str]) -> np.ndarray:
        """Return an array of shape (len(texts), dimension), dtype float32."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release network clients."""


class EnrichmentProvider(_Provider, ABC):
    """Extracts skills, seniority and a summary from a batch of texts.

    Returns one item per text: the raw answer (a dict, validated by the engine against
    :class:`Enrichment`) or an exception for that row.
    """

    @abstractmethod
    async def enrich(self, texts: list[str]) -> list[dict | Exception]:
        """Enrich each text; a per-row failure is returned, not raised."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release network clients."""
