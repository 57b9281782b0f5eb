"""What a provider's batch API must do for ``mode: batch``: submit request lines, say how a batch is
doing, hand back its answers line by line, and find a batch by the label it was submitted with.

The engine (:mod:`..engine.batch_stage`) does the rest, the same way for every provider: which texts go
in which batch within the limits, the journal that makes a killed run resume instead of resubmitting,
the cache, validation, failures and accounting. An answer is handed back in the shape the provider's
realtime call returns (vectors for a line of embedding inputs, a list of one dict for an enrichment),
so the stages read both the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from .base import ProviderError


@dataclass(frozen=True)
class BatchState:
    """A batch as the provider reports it; counts are of request lines (None where it gives none)."""

    status: str  # the provider's own word: validating, in_progress, completed, expired, JOB_STATE_RUNNING...
    finished: bool  # nothing more will be answered: collect what there is
    completed: int | None = None
    failed: int | None = None
    total: int | None = None
    error: str | None = None  # why the batch as a whole failed, in the provider's words


class BatchAPI(ABC):
    """One provider's batch endpoint for one stage (embeddings or enrichment)."""

    max_lines: int = 50_000  # request lines per batch
    max_inputs: int = 50_000  # texts per batch
    max_bytes: int = 190_000_000  # size of the request file (or inline payload)

    @abstractmethod
    async def submit(self, lines: list[list[str]], label: str) -> str:
        """Upload ``lines`` (texts per request line) and create a batch labelled ``label``; return its id."""

    @abstractmethod
    async def find(self, label: str) -> str | None:
        """The id of a batch created with ``label``, if the provider has one (a run killed mid-submit)."""

    @abstractmethod
    async def state(self, batch_id: str) -> BatchState: ...

    @abstractmethod
    async def answers(self, batch_id: str, texts: list[list[str]]) -> dict[int, object | ProviderError]:
        """Answers of a finished batch by line number (``texts``: each line's texts, "" where this run no longer
        has them); a line that failed is a :class:`ProviderError` with the provider's words; a line left
        unanswered (the batch expired or was cancelled) is absent. Usage of answered lines is accounted."""
