"""Runs a provider over many texts at the rate limit without losing paid work.

:mod:`.calls` makes one request with its retries under the shared rate budget; :mod:`.stages` runs the
one skeleton (prepare, cache, dedupe, batch, gather) with the embedding and enrichment hooks.
"""

from .calls import CallPolicy, FatalProviderError, RowFailure, call_with_retries, error_class
from .stages import EmbedOutcome, EnrichOutcome, embed_texts, enrich_texts, run_stage

__all__ = [
    "CallPolicy",
    "EmbedOutcome",
    "EnrichOutcome",
    "FatalProviderError",
    "RowFailure",
    "call_with_retries",
    "embed_texts",
    "enrich_texts",
    "error_class",
    "run_stage",
]
