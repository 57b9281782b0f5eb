"""The rows nearest a query: the check that the vectors are worth something, as the seeds do by hand.

The query is embedded by the dataset's own provider and model (Gemini: as a query, not a document). On
Postgres with a pgvector column the database ranks by its cosine distance operator (and its index); other
columns and SQLite are ranked with numpy, partition by partition, keeping only the best ``k``.
"""

from __future__ import annotations

import asyncio
import heapq
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .config import DatasetConfig
from .providers import build_embedding_provider
from .rows import text_col
from .stores import PartitionSpec, Store


@dataclass(frozen=True, order=True)
class Hit:
    similarity: float
    row_id: object
    text: str


def embed_query(dataset: DatasetConfig, query: str, api_key: str | None) -> np.ndarray:
    spec = dataset.embedding
    if spec.provider == "gemini" and (spec.task_type or "").startswith("RETRIEVAL_DOCUMENT"):
        spec = spec.model_copy(update={"task_type": "RETRIEVAL_QUERY"})
    provider = build_embedding_provider(spec, api_key)

    async def one() -> np.ndarray:
        try:
            await provider.preflight()
            return np.asarray(await provider.embed([query]), dtype=np.float32)[0]
        finally:
            await provider.aclose()

    vector = asyncio.run(one())
    return vector / (np.linalg.norm(vector) or 1.0)


def _preview(batch: pa.RecordBatch, fields: tuple[str, ...], row: int) -> str:
    return _join(tuple(batch.column(text_col(f))[row].as_py() or "" for f in fields))


def nearest(store: Store, dataset: DatasetConfig, query: np.ndarray, k: int) -> list[Hit]:
    """The ``k`` rows whose stored vectors are nearest ``query`` (cosine), best first."""
    fields = store.layout.text_fields
    ranked = store.rows.nearest(query, k)
    if ranked is not None:
        previews = store.rows.texts([row_id for row_id, _ in ranked])
        return [Hit(sim, row_id, _join(previews.get(row_id, ()))) for row_id, sim in ranked]
    best: list[Hit] = []
    # one pass over every row: partitions such as hash buckets would each scan the table
    for batch in store.rows.read_batches(PartitionSpec(key="all"), dataset.read_batch_size):
        column = batch.column("embedding")
        lengths = np.asarray(column.value_lengths().fill_null(0))
        usable = np.flatnonzero(lengths == len(query))
        if not len(usable):
            continue
        vectors = np.stack([np.asarray(column[int(i)].values, dtype=np.float32) for i in usable])
        norms = np.linalg.norm(vectors, axis=1)
        similarity = (vectors @ query) / np.where(norms == 0, 1.0, norms)
        for i, sim in zip(usable, similarity, strict=True):
            hit = Hit(float(sim), batch.column("id")[int(i)].as_py(), "")
            if len(best) < k:
                heapq.heappush(best, Hit(hit.similarity, hit.row_id, _preview(batch, fields, int(i))))
            elif hit.similarity > best[0].similarity:
                heapq.heapreplace(best, Hit(hit.similarity, hit.row_id, _preview(batch, fields, int(i))))
    return sorted(best, reverse=True)


def _join(parts: tuple[str, ...], width: int = 90) -> str:
    text = " | ".join(p.strip().replace("\n", " ") for p in parts if p and p.strip())
    return text if len(text) <= width else text[: width - 1] + "…"
