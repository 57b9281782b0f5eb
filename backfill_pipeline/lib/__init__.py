"""Component types and the Dagster definitions they build (the registry module for ``dg``)."""

from .embedding_backfill import EmbeddingBackfill
from .factory import backfill_definitions, dataset_definitions, job_name

__all__ = ["EmbeddingBackfill", "backfill_definitions", "dataset_definitions", "job_name"]
