"""A dataset's tables and columns, resolved once from the config, so stores never read the config."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DatasetConfig, TextSpec
from ..rows import enrichment_col


@dataclass(frozen=True)
class TableRef:
    """A table name with its optional schema (Postgres only)."""

    name: str
    schema: str | None = None

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


@dataclass(frozen=True)
class TableLayout:
    """Where a dataset's rows are read from and its results written to."""

    dataset: str
    source: TableRef
    id_column: str
    text_fields: tuple[str, ...]
    text: TextSpec  # how the text is made, for the hash computed in the database
    archive_column: str | None
    row_filter: str | None
    target: TableRef  # the source table itself when results are written in place
    target_id_column: str
    separate: bool
    embedding_column: str
    dimension: int
    content_hash_column: str
    model_column: str
    embedded_at_column: str
    enriched_at_column: str
    enrichment_hash_column: str
    enrichment_model_column: str
    enrichment_columns: tuple[tuple[str, str], ...]  # (field, column), in field order
    partition_kind: str = "id_range"
    trigger_columns: tuple[str, ...] = ()  # change capture by trigger: edits of these queue a row
    extra_source_columns: tuple[str, ...] = ()  # partition's time column, updated_at, watched columns

    @classmethod
    def from_config(cls, name: str, dataset: DatasetConfig) -> TableLayout:
        separate = dataset.target.mode == "table"
        source = TableRef(dataset.table, dataset.schema_name)
        target = TableRef(dataset.target.table, dataset.target.schema_name) if dataset.target.table else source
        books = dataset.bookkeeping
        return cls(
            dataset=name,
            source=source,
            id_column=dataset.id_column,
            text_fields=tuple(dataset.text.fields),
            text=dataset.text,
            archive_column=dataset.archive_column,
            row_filter=dataset.row_filter,
            target=target if separate else source,
            target_id_column=dataset.target.id_column if separate else dataset.id_column,
            separate=separate,
            embedding_column=dataset.embedding.column,
            dimension=dataset.embedding.dimension,
            content_hash_column=books.content_hash,
            model_column=books.model,
            embedded_at_column=books.embedded_at,
            enriched_at_column=books.enriched_at,
            enrichment_hash_column=books.enrichment_hash,
            enrichment_model_column=books.enrichment_model,
            enrichment_columns=tuple(dataset.enrichment_columns.items()),
            partition_kind=dataset.partitioning.kind,
            trigger_columns=tuple(
                dict.fromkeys(
                    [*dataset.text.fields, *([dataset.archive_column] if dataset.archive_column else [])]
                    + list(dataset.change_tracking.watch_columns)
                )
            )
            if dataset.change_tracking.trigger
            else (),
            extra_source_columns=tuple(
                dict.fromkeys(
                    c
                    for c in (
                        dataset.partitioning.column,
                        dataset.change_tracking.updated_at_column,
                        *dataset.change_tracking.watch_columns,
                    )
                    if c
                )
            ),
        )

    @property
    def enrichment_fields(self) -> list[str]:
        return [field for field, _ in self.enrichment_columns]

    @property
    def skills_column(self) -> str | None:
        return dict(self.enrichment_columns).get("skills")

    @property
    def result_columns(self) -> list[str]:
        """Every column the pipeline writes; nothing else is ever changed."""
        columns = [self.embedding_column, self.content_hash_column, self.model_column, self.embedded_at_column]
        if self.enrichment_columns:
            columns += [column for _, column in self.enrichment_columns] + [self.enriched_at_column]
            columns += [self.enrichment_hash_column, self.enrichment_model_column]
        return columns

    @property
    def timestamp_columns(self) -> tuple[str, str]:
        return self.embedded_at_column, self.enriched_at_column

    @property
    def needed_source_columns(self) -> list[str]:
        columns = [self.id_column, *self.text_fields] + ([self.archive_column] if self.archive_column else [])
        return list(dict.fromkeys(columns + list(self.extra_source_columns)))

    @property
    def stored_columns(self) -> list[str]:
        """The result columns read back with each row: embedding, hash, model, then enrichment fields."""
        columns = [self.embedding_column, self.content_hash_column, self.model_column]
        columns += [column for _, column in self.enrichment_columns]
        if self.enrichment_columns:
            columns += [self.enrichment_hash_column, self.enrichment_model_column]
        return columns

    def result_mapping(self, present: set[str]) -> dict[str, str]:
        """Target column -> results column, for the results columns in ``present``."""
        candidates = {
            self.embedding_column: "embedding",
            self.content_hash_column: "content_hash",
            self.model_column: "model",
            self.embedded_at_column: "embedded_at",
            self.enriched_at_column: "enriched_at",
            self.enrichment_hash_column: "enrichment_hash",
            self.enrichment_model_column: "enrichment_model",
            **{column: enrichment_col(field) for field, column in self.enrichment_columns},
        }
        return {target: source for target, source in candidates.items() if source in present}
