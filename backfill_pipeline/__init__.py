"""backfill_pipeline: find rows whose embeddings are missing, placeholder, stale or from an old model,
enrich and embed them, write them back, and keep new and edited rows current, as Dagster assets.

``backfill_pipeline.EmbeddingBackfill`` is the component type for a ``defs.yaml`` (this package is its
``dg`` registry module).
"""

from .lib import EmbeddingBackfill

__all__ = ["EmbeddingBackfill"]
