"""The provider interface every embedding and enrichment provider implements.

Calls take batches and are coroutines, so the engine can keep many requests in flight against a
remote API; offline providers simply compute in place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

SENIORITY_LEVELS = ("intern", "junior", "mid", "senior", "lead", "executive")
Seniority = Literal["intern", "junior", "mid", "senior", "lead", "executive"]


class Enrichment(BaseModel):
    """The schema an LLM's answer must satisfy before anything is written."""

    model_config = ConfigDict(extra="forbid")

    skills: list[str] = Field(default_factory=list, max_length=60)
    seniority: Seniority
    summary: str = Field(min_length=1, max_length=2000)

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
    extra: dict[str, int] = field(default_factory=dict)

    def add(self, other: Usage) -> None:
        for name in ("requests", "inputs", "input_tokens", "output_tokens", "rate_limited", "retries"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.truncated_inputs += other.truncated_inputs


class ProviderError(Exception):
    """A failure a provider reports for a batch or a row; ``kind`` says how the engine treats it."""

    kind: str = "permanent"

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        if kind:
            self.kind = kind


class EmbeddingProvider(ABC):
    """Turns batches of texts into float32 vectors of ``dimension`` values."""

    name: str
    model: str
    dimension: int
    max_batch_size: int = 2048

    def __init__(self) -> None:
        self.usage = Usage()

    @abstractmethod
    async def embed(self, texts: list[str]) -> np.ndarray:
        """Return an array of shape (len(texts), dimension), dtype float32."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release network clients."""


class EnrichmentProvider(ABC):
    """Extracts skills, seniority and a summary from a batch of texts.

    Returns one item per text: the raw answer (a dict, validated by the engine against
    :class:`Enrichment`) or an exception for that row.
    """

    name: str
    model: str

    def __init__(self) -> None:
        self.usage = Usage()

    @abstractmethod
    async def enrich(self, texts: list[str]) -> list[dict | Exception]:
        """Enrich each text; a per-row failure is returned, not raised."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release network clients."""
