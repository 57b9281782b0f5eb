"""backfill_pipeline: find rows whose embeddings are missing, placeholder, stale or from an old model,
enrich and embed them, write them back, and keep new and edited rows current, as Dagster assets.

``backfill_pipeline.EmbeddingBackfill`` is the component type for a ``defs.yaml`` (this package is its
``dg`` registry module). It is loaded on first use, so the CLI can start its first paid requests before
Dagster is imported (see :mod:`backfill_pipeline.head_start`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .lib import EmbeddingBackfill

__all__ = ["EmbeddingBackfill"]


def __getattr__(name: str) -> object:
    if name == "EmbeddingBackfill":
        from .lib import EmbeddingBackfill

        return EmbeddingBackfill
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "EmbeddingBackfill"])
