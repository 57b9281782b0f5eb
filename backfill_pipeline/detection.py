"""Which rows need work, and why.

Vector checks run on the flattened values of the whole partition at once (``np.*.reduceat`` over row
offsets), so the cost is a handful of numpy passes, not a Python loop per value.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from enum import Enum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import DatasetConfig
from .rows import EMBEDDING_ERROR, TEXT_ERROR, enrichment_col
from .text import content_hash, render_column


class Reason(str, Enum):
    OK = "ok"
    NO_TEXT = "no_text"
    NULL_EMBEDDING = "null_embedding"
    UNREADABLE = "unreadable_embedding"
    UNDECODABLE_TEXT = "undecodable_text"
    NON_FINITE = "non_finite"
    PLACEHOLDER_ZERO = "placeholder_zero"
    PLACEHOLDER_CONSTANT = "placeholder_constant"
    PLACEHOLDER_SEQUENTIAL = "placeholder_sequential"
    WRONG_DIMENSION = "wrong_dimension"
    MODEL_CHANGED = "model_changed"
    STALE = "stale"
    UNHASHED = "unhashed"
    ENRICHMENT_MISSING = "enrichment_missing"
    ENRICHMENT_STALE = "enrichment_stale"
    ENRICHMENT_MODEL_CHANGED = "enrichment_model_changed"
    FORCED = "forced"
    COOLING_DOWN = "failed_cooling_down"
    DEFERRED = "deferred_by_limit"


# Reasons a vector itself is unusable, in order of precedence (first match wins).
VECTOR_REASONS = (
    Reason.NULL_EMBEDDING,
    Reason.NON_FINITE,
    Reason.PLACEHOLDER_ZERO,
    Reason.PLACEHOLDER_CONSTANT,
    Reason.PLACEHOLDER_SEQUENTIAL,
    Reason.WRONG_DIMENSION,
)


def classify_vectors(embeddings: pa.Array | pa.ChunkedArray, dimension: int) -> np.ndarray:
    """One :class:`Reason` value per row: a vector reason, or ``ok`` for a usable vector."""
    if isinstance(embeddings, pa.ChunkedArray):
        embeddings = embeddings.combine_chunks() if embeddings.num_chunks else pa.array([], pa.list_(pa.float32()))
    n = len(embeddings)
    out = np.full(n, Reason.OK.value, dtype=object)
    if n == 0:
        return out
    lengths = pc.list_value_length(embeddings).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(embeddings).to_numpy(zero_copy_only=False).astype(np.float64)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])

    has = lengths > 0
    idx = starts[has]
    lens = lengths[has]
    non_finite = np.zeros(n, dtype=bool)
    zero = np.zeros(n, dtype=bool)
    constant = np.zeros(n, dtype=bool)
    sequential = np.zeros(n, dtype=bool)
    if idx.size:
        finite = np.isfinite(flat)
        non_finite[has] = np.add.reduceat((~finite).astype(np.int64), idx) > 0
        clean = np.where(finite, flat, 0.0)
        lo = np.minimum.reduceat(clean, idx)
        hi = np.maximum.reduceat(clean, idx)
        zero[has] = (lo == 0) & (hi == 0)
        constant[has] = (lo == hi) & ~zero[has]
        # arithmetic progressions (0.414, 0.415, 0.416, ...): every step equals the first one
        step = np.zeros_like(clean)
        step[:-1] = clean[1:] - clean[:-1]
        ends = idx + lens - 1
        step[ends] = 0.0
        first = step[idx]
        deviation = np.abs(step - np.repeat(first, lens))
        deviation[ends] = 0.0
        worst = np.maximum.reduceat(deviation, idx)
        tolerance = np.maximum(1e-6, 0.01 * np.abs(first))
        sequential[has] = (lens >= 3) & (first != 0) & (worst <= tolerance)

    masks = {
        Reason.NULL_EMBEDDING: ~has,
        Reason.NON_FINITE: non_finite,
        Reason.PLACEHOLDER_ZERO: zero,
        Reason.PLACEHOLDER_CONSTANT: constant,
        Reason.PLACEHOLDER_SEQUENTIAL: sequential,
        Reason.WRONG_DIMENSION: lengths != dimension,
    }
    for reason in reversed(VECTOR_REASONS):  # later assignment wins, so go from lowest precedence
        out[masks[reason]] = reason.value
    return out


def detect(
    raw: pa.Table,
    dataset: DatasetConfig,
    *,
    force: bool = False,
    cooling_ids: Collection[object] = (),
) -> pa.Table:
    """Classify every raw row; return id, archive, text, new content hash, reason and what work it needs."""
    texts, present = render_column(dataset.text, raw)
    hashes = [content_hash(t) for t in texts]
    present_np = np.asarray(present, dtype=bool)
    reasons = classify_vectors(raw.column("embedding"), dataset.embedding.dimension)
    if EMBEDDING_ERROR in raw.column_names:  # a stored value that is no list of numbers: re-embed it
        reasons[raw.column(EMBEDDING_ERROR).is_valid().to_numpy(zero_copy_only=False)] = Reason.UNREADABLE.value

    stored_hash = np.asarray(raw.column("content_hash").to_pylist(), dtype=object)
    stored_model = np.asarray(raw.column("model").to_pylist(), dtype=object)
    new_hash = np.asarray(hashes, dtype=object)
    usable = reasons == Reason.OK.value
    has_hash = stored_hash != None  # noqa: E711 - elementwise comparison on an object array
    has_model = stored_model != None  # noqa: E711
    model_changed = usable & has_model & (stored_model != dataset.embedding.model)
    reasons[model_changed] = Reason.MODEL_CHANGED.value
    stale = usable & has_hash & (stored_hash != new_hash)
    reasons[stale] = Reason.STALE.value
    if dataset.unhashed_rows == "redo":
        reasons[usable & ~has_hash & ~model_changed] = Reason.UNHASHED.value

    needs_embedding = reasons != Reason.OK.value
    enrichment_missing = np.zeros(raw.num_rows, dtype=bool)
    for field in dataset.enrichment_columns:
        values = raw.column(enrichment_col(field))
        enrichment_missing |= values.is_null().to_numpy(zero_copy_only=False)
    enrichment_stale, enrichment_model_changed = _enrichment_provenance(raw, dataset, new_hash, stale)
    needs_enrichment = enrichment_missing | enrichment_stale | enrichment_model_changed
    if not dataset.enrichment.enabled:
        needs_enrichment[:] = False
    untouched = reasons == Reason.OK.value
    reasons[untouched & enrichment_model_changed] = Reason.ENRICHMENT_MODEL_CHANGED.value
    reasons[untouched & enrichment_stale] = Reason.ENRICHMENT_STALE.value
    reasons[untouched & enrichment_missing] = Reason.ENRICHMENT_MISSING.value
    if dataset.embedding.include_enrichment:
        needs_embedding |= needs_enrichment

    if force:
        reasons[reasons == Reason.OK.value] = Reason.FORCED.value
        needs_embedding[:] = True
        needs_enrichment[:] = dataset.enrichment.enabled
    elif cooling_ids:
        ids = raw.column("id").to_pylist()
        cooling = np.fromiter((i in cooling_ids for i in ids), dtype=bool, count=len(ids))
        cooling &= needs_embedding | needs_enrichment
        reasons[cooling] = Reason.COOLING_DOWN.value
        needs_embedding[cooling] = False
        needs_enrichment[cooling] = False

    reasons[~present_np] = Reason.NO_TEXT.value
    text_errors = raw.column(TEXT_ERROR) if TEXT_ERROR in raw.column_names else pa.nulls(raw.num_rows, pa.string())
    if text_errors.null_count < raw.num_rows:  # text that could not be read: reported and recorded, never sent
        unreadable = text_errors.is_valid().to_numpy(zero_copy_only=False)
        reasons[unreadable] = Reason.UNDECODABLE_TEXT.value
        present_np &= ~unreadable
    needs_embedding &= present_np
    needs_enrichment &= present_np
    work = needs_embedding | needs_enrichment
    return pa.table(
        {
            "id": raw.column("id"),
            "archive": raw.column("archive"),
            "text": pa.array([t if w else None for t, w in zip(texts, work, strict=True)], pa.string()),
            "content_hash": pa.array(hashes, pa.string()),
            "reason": pa.array(reasons.tolist(), pa.string()),
            "needs_embedding": pa.array(needs_embedding),
            "needs_enrichment": pa.array(needs_enrichment),
            TEXT_ERROR: text_errors,
            **{
                enrichment_col(f): raw.column(enrichment_col(f))
                for f in dataset.enrichment_columns
                if f in ("summary", "skills")
            },
        }
    )


def _enrichment_provenance(
    raw: pa.Table, dataset: DatasetConfig, new_hash: np.ndarray, embedding_stale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Whether each row's stored enrichment was made from other text, or by another model.

    The enrichment keeps its own hash and model, so a failed enrichment next to a fresh embedding is still
    seen as stale. A row enriched before the enrichment had its own hash falls back to the embedding's.
    """
    none = np.zeros(raw.num_rows, dtype=bool)
    if "enrichment_hash" not in raw.column_names:
        return embedding_stale, none
    stored_hash = np.asarray(raw.column("enrichment_hash").to_pylist(), dtype=object)
    stored_model = np.asarray(raw.column("enrichment_model").to_pylist(), dtype=object)
    has_hash = stored_hash != None  # noqa: E711 - elementwise comparison on an object array
    stale = np.where(has_hash, stored_hash != new_hash, embedding_stale).astype(bool)
    model_changed = (stored_model != None) & (stored_model != dataset.enrichment.model)  # noqa: E711
    return stale, model_changed.astype(bool)


def apply_limit(detected: pa.Table, limit: int) -> pa.Table:
    """Keep the work of the first ``limit`` rows needing it; defer the rest to a later run."""
    work = pc.or_(detected.column("needs_embedding"), detected.column("needs_enrichment")).to_numpy(
        zero_copy_only=False
    )
    deferred = work & (np.cumsum(work) > limit)
    if not deferred.any():
        return detected
    keep = pa.array(~deferred)
    reasons = pc.if_else(pa.array(deferred), pa.scalar(Reason.DEFERRED.value), detected.column("reason"))
    out = detected.set_column(detected.schema.get_field_index("reason"), "reason", reasons)
    for column in ("needs_embedding", "needs_enrichment"):
        out = out.set_column(out.schema.get_field_index(column), column, pc.and_(out.column(column), keep))
    return out


def reason_counts(detected: pa.Table) -> dict[str, int]:
    return dict(Counter(detected.column("reason").to_pylist()))
