"""The Arrow tables that flow between the provider steps and the write: plain functions, no Dagster.

An enrichment or embeddings table holds one row per row sent, with its result or its error; the write
merges them into one row per id holding only the columns to write.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from .config import DatasetConfig
from .engine import EmbedOutcome, EnrichOutcome, RowFailure
from .rows import TEXT_ERROR, enrichment_col, matrix_array
from .stores import Failure
from .stores.base import utc_now
from .text import embedding_input


def enrichment_schema(dataset: DatasetConfig, id_type: pa.DataType) -> pa.Schema:
    fields = [pa.field("id", id_type)]
    fields += [pa.field(enrichment_col(f), pa.string()) for f in dataset.enrichment_columns]
    fields += [pa.field("content_hash", pa.string())]  # the text it was made from
    fields += [pa.field("error_class", pa.string()), pa.field("error", pa.string())]
    return pa.schema(fields)


def embeddings_schema(dataset: DatasetConfig, id_type: pa.DataType) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", id_type),
            pa.field("embedding", pa.list_(pa.float32(), dataset.embedding.dimension)),
            pa.field("content_hash", pa.string()),
            pa.field("model", pa.string()),
            pa.field("error_class", pa.string()),
            pa.field("error", pa.string()),
        ]
    )


def id_type_of(table: pa.Table) -> pa.DataType:
    """The ids' type: int64 for integer keys, string for the text of others (UUIDs, text keys)."""
    return table.schema.field("id").type


def _errors(failures: list[RowFailure], rows: int) -> tuple[pa.Array, pa.Array]:
    classes: list[str | None] = [None] * rows
    messages: list[str | None] = [None] * rows
    for failure in failures:
        classes[failure.index], messages[failure.index] = failure.error_class, failure.message
    return pa.array(classes, pa.string()), pa.array(messages, pa.string())


def _without_unsent(table: pa.Table, unsent: list[int]) -> pa.Table:
    """Rows a graceful stop left unsent have neither a result nor a failure: they are not in the table."""
    if not unsent:
        return table
    keep = [True] * table.num_rows
    for i in unsent:
        keep[i] = False
    return table.filter(pa.array(keep))


def enrichment_table(dataset: DatasetConfig, todo: pa.Table, outcome: EnrichOutcome) -> pa.Table:
    """One row per row sent for enrichment: its fields (skills as a JSON array), or its error."""
    columns: dict[str, pa.Array | pa.ChunkedArray] = {"id": todo.column("id")}
    for field in dataset.enrichment_columns:
        values: list[str | None] = []
        for result in outcome.results:
            if result is None:
                values.append(None)
            elif field == "skills":
                values.append(json.dumps(result.skills, ensure_ascii=False))
            else:
                values.append(getattr(result, field))
        columns[enrichment_col(field)] = pa.array(values, pa.string())
    made = pa.array([r is not None for r in outcome.results])
    columns["content_hash"] = pc.if_else(made, todo.column("content_hash"), pa.scalar(None, pa.string()))
    columns["error_class"], columns["error"] = _errors(outcome.failures, todo.num_rows)
    return _without_unsent(pa.table(columns, schema=enrichment_schema(dataset, id_type_of(todo))), outcome.unsent)


def embeddings_table(dataset: DatasetConfig, todo: pa.Table, outcome: EmbedOutcome) -> pa.Table:
    """One row per row sent for embedding: vector, content hash and model, or its error."""
    ok = outcome.ok
    error_class, error = _errors(outcome.failures, todo.num_rows)
    table = pa.table(
        {
            "id": todo.column("id"),
            "embedding": matrix_array(outcome.vectors, ok),
            "content_hash": pc.if_else(pa.array(ok), todo.column("content_hash"), pa.scalar(None, pa.string())),
            "model": pa.array([dataset.embedding.model if good else None for good in ok], pa.string()),
            "error_class": error_class,
            "error": error,
        },
        schema=embeddings_schema(dataset, id_type_of(todo)),
    )
    return _without_unsent(table, outcome.unsent)


def failed_ids(table: pa.Table) -> pa.Array:
    return pc.filter(table.column("id"), pc.is_valid(table.column("error")))


def embedding_texts(dataset: DatasetConfig, todo: pa.Table, enrichment: pa.Table) -> list[str]:
    """The texts to embed: the row's text, plus its (fresh, else stored) enrichment when configured."""
    texts = todo.column("text").to_pylist()
    if not dataset.embedding.include_enrichment:
        return texts
    fields = dataset.enrichment_columns

    def column(table: pa.Table, field: str) -> list:
        name = enrichment_col(field)
        present = field in fields and name in table.column_names
        return table.column(name).to_pylist() if present else [None] * table.num_rows

    fresh = dict(
        zip(
            enrichment.column("id").to_pylist(),
            zip(column(enrichment, "summary"), column(enrichment, "skills"), strict=True),
            strict=True,
        )
    )
    stored = zip(column(todo, "summary"), column(todo, "skills"), strict=True)
    out = []
    for row_id, text, own in zip(todo.column("id").to_pylist(), texts, stored, strict=True):
        summary, skills = fresh.get(row_id, own)
        out.append(embedding_input(text, summary, skills))
    return out


def stage_failures(stage: str, table: pa.Table) -> list[Failure]:
    """The failed rows of one provider step's table."""
    failed = table.filter(pc.is_valid(table.column("error"))).select(["id", "error_class", "error"])
    return [Failure(r["id"], stage, r["error_class"], r["error"]) for r in failed.to_pylist()]


def unreadable_failures(detected: pa.Table) -> list[Failure]:
    """Rows whose text could not be read (``id`` and the text error of the detected rows)."""
    unreadable = detected.filter(pc.is_valid(detected.column(TEXT_ERROR))).select(["id", TEXT_ERROR])
    return [Failure(r["id"], "read", "undecodable_text", r[TEXT_ERROR]) for r in unreadable.to_pylist()]


def merge_results(dataset: DatasetConfig, enrichment: pa.Table, embeddings: pa.Table) -> pa.Table:
    """One row per id with a successful result, holding the columns to write (nulls leave values alone).

    Each stage records what it was made from: the embedding its content hash and model, the enrichment its
    own. A row whose enrichment failed gets an empty enrichment hash beside its fresh embedding, so its old
    enrichment (made from older text) is still seen as stale by the next run.
    """
    emb = embeddings.filter(pc.is_null(embeddings.column("error")))
    enr = enrichment.filter(pc.is_null(enrichment.column("error")))
    emb_ids = emb.column("id").to_pylist()
    enr_ids = enr.column("id").to_pylist()
    ids = sorted(set(emb_ids) | set(enr_ids))
    emb_pos = {i: n for n, i in enumerate(emb_ids)}
    enr_pos = {i: n for n, i in enumerate(enr_ids)}
    emb_take = pa.array([emb_pos.get(i) for i in ids], pa.int64())
    enr_take = pa.array([enr_pos.get(i) for i in ids], pa.int64())
    now = utc_now().isoformat()
    columns: dict[str, pa.Array] = {"id": pa.array(ids, id_type_of(embeddings))}
    for column in ("embedding", "content_hash", "model"):
        columns[column] = pc.take(emb.column(column), emb_take)
    columns["embedded_at"] = pc.if_else(pc.is_valid(emb_take), pa.scalar(now), pa.scalar(None, pa.string()))
    if dataset.enrichment.enabled:
        for field in dataset.enrichment_columns:
            columns[enrichment_col(field)] = pc.take(enr.column(enrichment_col(field)), enr_take)
        enriched = pc.is_valid(enr_take)
        columns["enriched_at"] = pc.if_else(enriched, pa.scalar(now), pa.scalar(None, pa.string()))
        failed = pc.is_in(columns["id"], value_set=failed_ids(enrichment))
        made_from = pc.take(enr.column("content_hash"), enr_take)
        columns["enrichment_hash"] = pc.if_else(failed, pa.scalar(""), made_from)
        model = pa.scalar(dataset.enrichment.model)
        columns["enrichment_model"] = pc.if_else(enriched, model, pa.scalar(None, pa.string()))
    return pa.table(columns)
