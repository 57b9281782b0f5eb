"""Embeddings asked for while a partition is enriched, when the embedded text leaves the enrichment out.

Then a row's vector does not wait on its enrichment, and the embeddings step after enrichment only finds
answers: each window's texts go to the embedding provider alongside the window's chat requests, and the
answers go to the paid-results cache, where the embeddings step reads them as cache hits. A partition's
last chat answer is then followed by its write, not by a second round of paced requests (about a second
at a tier's token limit, on every partition's end).

It is an optimisation only: a failure here is logged and leaves the rows to the embeddings step, which
handles, retries and records them as it always does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from .config import DatasetConfig, EmbeddingSpec
from .engine import CallPolicy, embed_texts
from .engine.calls import error_message
from .policy import build_policy
from .providers.base import EmbeddingProvider
from .reporting import Log, usage_metadata
from .stores import Ledger

FLAG = "needs_embedding"
PREFIX = "embedding_ahead"


def embeds_ahead(dataset: DatasetConfig) -> bool:
    """Whether the embeddings can go ahead: enrichment runs, the embedded text does not include it, both
    stages call a paid provider in real time (batch mode submits a partition as one), and a cache keeps
    the answers for the embeddings step."""
    embedding, enrichment = dataset.embedding, dataset.enrichment
    return (
        enrichment.enabled
        and not embedding.include_enrichment
        and "batch" not in (embedding.mode, enrichment.mode)
        and embedding.provider not in ("offline", "local")
        and dataset.cache.backend != "none"
    )


@dataclass
class EmbeddingsAhead:
    """One enrichment step's embeddings sent ahead, window by window."""

    provider: EmbeddingProvider
    policy: CallPolicy
    spec: EmbeddingSpec
    log: Log
    rows: int = 0  # embedded here (paid for) and cached
    stopped: str | None = field(default=None)  # why it stopped early (the embeddings step does the rest)

    async def window(self, todo: pa.Table) -> None:
        """Embed the window's rows that need a vector, into the cache."""
        if self.stopped is not None or FLAG not in todo.column_names:
            return
        texts = todo.filter(pc.fill_null(todo.column(FLAG), False)).column("text").to_pylist()
        if not texts:
            return
        hits = self.provider.usage.cache_hits
        try:
            outcome = await embed_texts(self.provider, texts, batch_size=self.spec.batch_size, policy=self.policy)
        except Exception as exc:  # noqa: BLE001 - the embeddings step meets the same error and reports it
            self.stopped = error_message(exc, limit=300)  # keys quoted by an API are masked
            self.log.warning(f"embeddings ahead of enrichment stopped ({self.stopped}); the embeddings step does them")
            return
        self.rows += int(outcome.ok.sum()) - (self.provider.usage.cache_hits - hits)  # paid for here

    async def aclose(self) -> None:
        await self.provider.aclose()
        await self.policy.cache.aclose()

    def metadata(self) -> dict[str, object]:
        """What it asked and paid, for the enrichment step's metadata (the run summary adds it to the
        embedding stage's figures)."""
        return {f"{PREFIX}_rows": self.rows, **usage_metadata(self.provider.usage, self.spec, PREFIX)}


def embeddings_ahead(
    dataset: DatasetConfig, provider: EmbeddingProvider, ledger: Ledger, stop: Callable[[], bool], log: Log
) -> EmbeddingsAhead:
    """Sending ahead under the embedding model's own policy: its shared rate budget and the same cache and
    claims as the embeddings step, so no text is paid twice by the two steps or by other runs."""
    policy = build_policy(dataset, dataset.embedding, ledger, stop=stop)
    return EmbeddingsAhead(provider, policy, dataset.embedding, log)
