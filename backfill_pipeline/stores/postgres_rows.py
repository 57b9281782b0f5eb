"""The production store's rows: PostgreSQL through psycopg 3, with or without pgvector.

- Reads stream the partition through a server-side cursor, ``batch_size`` rows at a time.
- Writes (see :mod:`.postgres_writes`) stage each batch with ``COPY ... FORMAT BINARY`` and apply it in
  one statement, one transaction per batch.
- The embedding column's type is read from the catalog: pgvector ``vector(n)``/``halfvec(n)``,
  ``real[]``/``double precision[]``, ``jsonb``/``json`` holding an array, or JSON text.
- Identifiers are always composed with ``psycopg.sql.Identifier``; the dataset's ``row_filter`` is the
  only raw SQL, and the config documents it as trusted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import sql

from ..rows import parse_float_list
from . import postgres_queue
from .base import FAILURES_TABLE, PartitionSpec, RowStore, SchemaError, WriteStats
from .groups import Grouping, GroupQueries, WorkTest, postgres_dialect
from .layout import TableLayout, TableRef
from .postgres_catalog import Catalog, ColumnType, Timeouts, identifier
from .postgres_writes import write_results

SKILLS_TYPES = ("jsonb", "json", "_text", "_varchar", "text", "varchar")
INTEGER_TYPES = ("int2", "int4", "int8")
TIME_TYPES = ("timestamptz", "timestamp", "date")


def decode_vector(text: str | None) -> np.ndarray | None:
    """Any supported column's text form ('[1,2]', '{1,2}', JSON) as float32; ``None`` for NULL/JSON null."""
    if text is None or text == "null":
        return None
    body = text.strip()
    if len(body) < 2 or body[0] not in "[{" or body[-1] not in "]}":
        raise ValueError(f"not an array: {body[:40]!r}")
    return parse_float_list(body[1:-1])


class PostgresRows(RowStore):
    def __init__(
        self,
        layout: TableLayout,
        conn: psycopg.Connection,
        url: str,
        pgvector: bool,
        concurrency: int,
        timeouts: Timeouts,
    ):
        super().__init__(layout)
        self.conn = conn
        self.url = url
        self.timeouts = timeouts
        self.has_pgvector = pgvector
        self.write_concurrency = concurrency
        self.catalog = Catalog(conn)
        self.src = identifier(layout.source)
        self.dst = identifier(layout.target)
        self.id = sql.Identifier(layout.id_column)
        self.dst_id = sql.Identifier(layout.target_id_column)

    # -- schema ----------------------------------------------------------------------------------
    def target_columns(self, refresh: bool = False) -> dict[str, ColumnType]:
        return self.catalog.columns(self.layout.target, refresh)

    def embedding_type(self) -> ColumnType:
        found = self.target_columns().get(self.layout.embedding_column)
        if found is None:
            raise SchemaError(
                f"dataset '{self.layout.dataset}': column {self.layout.target}.{self.layout.embedding_column} "
                "does not exist"
            )
        return found

    def missing_columns(self) -> list[str]:
        lay = self.layout
        source = self.catalog.columns(lay.source, refresh=True)
        if not source:
            raise SchemaError(f"dataset '{lay.dataset}': table {self.src.as_string(self.conn)} does not exist")
        absent = [c for c in lay.needed_source_columns if c not in source]
        if absent:
            raise SchemaError(f"dataset '{lay.dataset}': table {lay.source} has no column(s) {', '.join(absent)}")
        queue = postgres_queue.missing(self) if lay.trigger_columns else []
        target = self.target_columns(refresh=True)
        if not target:
            return [f"{lay.target.name} (table)", *queue]
        return [f"{lay.target.name}.{c}" for c in lay.result_columns if c not in target] + queue

    def check_columns(self) -> None:
        lay = self.layout
        emb = self.embedding_type()
        where = f"dataset '{lay.dataset}': column {lay.target.name}.{lay.embedding_column}"
        if emb.vector_kind is None:
            raise SchemaError(
                f"{where} has type {emb.formatted}; supported are vector(n), halfvec(n), real[], "
                "double precision[], jsonb, json and text"
            )
        if emb.dimension is not None and emb.dimension != lay.dimension:
            raise SchemaError(
                f"{where} is {emb.formatted} but embedding.dimension is {lay.dimension}; set "
                f"embedding.dimension to {emb.dimension} or change the column's type"
            )
        self.check_keys()
        if lay.separate and not self._unique(lay.target, lay.target_id_column):
            raise SchemaError(
                f"dataset '{lay.dataset}': column {lay.target}.{lay.target_id_column} has no primary key or unique "
                "index; results are upserted by it, so add one (e.g. ALTER TABLE … ADD PRIMARY KEY "
                f"({lay.target_id_column}))"
            )
        skills = lay.skills_column
        if skills is not None:
            kind = self.target_columns()[skills]
            if kind.typname not in SKILLS_TYPES:
                raise SchemaError(
                    f"dataset '{lay.dataset}': column {lay.target.name}.{skills} has type {kind.formatted}; "
                    "skills need jsonb, json, text[] or text"
                )

    def id_column_type(self) -> ColumnType:
        lay = self.layout
        columns = self.catalog.columns(lay.source)
        if not columns:
            raise SchemaError(f"dataset '{lay.dataset}': table {lay.source} does not exist")
        id_type = columns.get(lay.id_column)
        if id_type is None:
            raise SchemaError(f"dataset '{lay.dataset}': table {lay.source} has no column(s) {lay.id_column}")
        return id_type

    def integer_ids(self) -> bool:
        return self.id_column_type().typname in INTEGER_TYPES

    def check_keys(self) -> None:
        """Partitions by id range need integer ids: a UUID or text id is one clear error, before any
        statement casts it (``cannot cast type uuid to bigint``); time partitions need a timestamp."""
        lay = self.layout
        id_type = self.id_column_type()
        if lay.partition_kind == "id_range" and id_type.typname not in INTEGER_TYPES:
            raise SchemaError(
                f"dataset '{lay.dataset}': id column {lay.source}.{lay.id_column} has type {id_type.formatted}; "
                "partitions by id range need an integer column (smallint, integer or bigint); for other keys "
                "use partitioning: {kind: hash, buckets: 16}"
            )
        time_column = self._time_column()
        if time_column is not None:
            kind = self.catalog.columns(lay.source).get(time_column)
            if kind is None or kind.typname not in TIME_TYPES:
                found = "does not exist" if kind is None else f"has type {kind.formatted}"
                raise SchemaError(
                    f"dataset '{lay.dataset}': column {lay.source}.{time_column} {found}; time partitions need a "
                    "timestamp, timestamptz or date column (partitioning.column)"
                )

    def _time_column(self) -> str | None:
        extra = self.layout.extra_source_columns
        return extra[0] if self.layout.partition_kind == "time" and extra else None

    def queries(self) -> GroupQueries:
        lay = self.layout
        self.check_keys()
        source = self.catalog.columns(lay.source)
        time_column = self._time_column()
        time_type = source.get(time_column) if time_column else None
        vector = self.target_columns().get(lay.embedding_column)
        failures = TableRef(FAILURES_TABLE, lay.target.schema)
        return GroupQueries(
            lay,
            postgres_dialect(vector.typname if vector else None, time_type.typname if time_type else None),
            lambda query, params: self.conn.execute(query, params).fetchall(),
            self._source_filtered().as_string(self.conn),
            self.dst.as_string(self.conn),
            identifier(failures).as_string(self.conn) if self.catalog.exists(failures) else None,
            self.integer_ids(),
        )

    def delete_orphans(self, part: PartitionSpec) -> int:
        statement, params = self.queries().orphans_statement(part)
        with self.conn.transaction():
            return self.conn.execute(statement, params).rowcount

    def _unique(self, table: TableRef, column: str) -> bool:
        """Whether a unique index (or the primary key) covers exactly ``column`` of ``table``."""
        row = self.conn.execute(
            "SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
            "WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indnatts = 1 AND a.attname = %s",
            [identifier(table).as_string(self.conn), column],
        ).fetchone()
        return row is not None

    def _result_column_type(self, column: str) -> str:
        lay = self.layout
        if column == lay.embedding_column:
            return f"vector({lay.dimension})" if self.has_pgvector else "real[]"
        if column in lay.timestamp_columns:
            return "timestamptz"
        if column == lay.skills_column:
            return "jsonb"
        return "text"

    def add_missing_columns(self) -> None:
        lay = self.layout
        if not self.catalog.exists(lay.target):
            source_id = self.catalog.columns(lay.source)[lay.id_column].formatted
            cols = [
                sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(self._result_column_type(c)))
                for c in lay.result_columns
            ]
            self.conn.execute(
                sql.SQL("CREATE TABLE {} ({} {} PRIMARY KEY, {})").format(
                    self.dst,
                    self.dst_id,
                    sql.SQL(source_id),
                    sql.SQL(", ").join(cols),
                )
            )
        existing = self.target_columns(refresh=True)
        for column in lay.result_columns:
            if column not in existing:
                self.conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                        self.dst, sql.Identifier(column), sql.SQL(self._result_column_type(column))
                    )
                )
        if lay.trigger_columns:
            postgres_queue.install(self, list(lay.trigger_columns))
        self.catalog.forget()

    def queued_groups(self, grouping: Grouping, after: int) -> tuple[list[tuple], int]:
        return postgres_queue.queued_groups(self, grouping, after)

    def acknowledge_queue(self, upto: int) -> int:
        return postgres_queue.acknowledge(self, upto)

    # -- partitions ------------------------------------------------------------------------------
    def _source_filtered(self) -> sql.Composable:
        where: sql.Composable = sql.SQL("")
        if self.layout.row_filter:
            # Trusted SQL from the config file: the one place raw SQL enters a statement.
            # Every statement reading it passes parameters, so a literal % (LIKE 'a%') is written %%.
            where = sql.SQL(" WHERE ({})").format(sql.SQL(self.layout.row_filter.replace("%", "%%")))
        return sql.SQL("(SELECT * FROM {}{}) AS s").format(self.src, where)

    def nearest(self, query: np.ndarray, k: int) -> list[tuple[object, float]] | None:
        emb = self.embedding_type()
        if emb.vector_kind not in ("vector", "halfvec"):
            return None
        from pgvector import HalfVector, Vector

        value = Vector(query) if emb.vector_kind == "vector" else HalfVector(query)
        column = sql.Identifier(self.layout.embedding_column)
        rows = self.conn.execute(
            sql.SQL(
                "SELECT {id}, 1 - ({e} <=> %(q)s) FROM {t} WHERE {e} IS NOT NULL ORDER BY {e} <=> %(q)s LIMIT %(k)s"
            ).format(id=self.dst_id, e=column, t=self.dst),
            {"q": value, "k": k},
        ).fetchall()
        as_key = (lambda i: i) if self.integer_ids() else str
        return [(as_key(row_id), float(sim)) for row_id, sim in rows]

    def texts(self, row_ids: Sequence[object]) -> dict[object, tuple[str, ...]]:
        fields = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(f)) for f in self.layout.text_fields)
        rows = self.conn.execute(
            sql.SQL("SELECT {}, {} FROM {} WHERE {}{} = ANY(%s)").format(
                self.id, fields, self.src, self.id, sql.SQL("" if self.integer_ids() else "::text")
            ),
            [list(row_ids) if self.integer_ids() else [str(i) for i in row_ids]],
        ).fetchall()
        return {row[0] if self.integer_ids() else str(row[0]): tuple(row[1:]) for row in rows}

    # -- rows ------------------------------------------------------------------------------------
    def _as_text(self, alias: str, column: str) -> sql.Composable:
        kind = self.target_columns().get(column)
        if kind is None:  # not added yet (a plan before `migrate`): read as NULL, so every row needs work
            return sql.SQL("NULL")
        ref = sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(column))
        if kind.category == "A" and kind.typname not in ("_float4", "_float8"):
            return sql.SQL("array_to_json({})::text").format(ref)
        return sql.SQL("{}::text").format(ref)

    def read_batches(
        self, part: PartitionSpec, batch_size: int, pending: WorkTest | None = None
    ) -> Iterator[pa.RecordBatch]:
        lay = self.layout
        r = "r" if lay.separate else "s"
        integer_ids = self.integer_ids()
        select: list[sql.Composable] = [sql.SQL("s.{}::bigint" if integer_ids else "s.{}::text").format(self.id)]
        select.append(
            sql.SQL("s.{}::text").format(sql.Identifier(lay.archive_column)) if lay.archive_column else sql.SQL("NULL")
        )
        select += [sql.SQL("s.{}::text").format(sql.Identifier(f)) for f in lay.text_fields]
        select += [self._as_text(r, column) for column in lay.stored_columns]
        join = (
            sql.SQL(" LEFT JOIN {} AS r ON r.{} = s.{}").format(self.dst, self.dst_id, self.id)
            if lay.separate and self.target_columns()
            else sql.SQL("")
        )
        clause, params = self.where_clause(part, pending)
        where = sql.SQL(clause)
        query = sql.SQL("SELECT {} FROM {}{}{} ORDER BY s.{}").format(
            sql.SQL(", ").join(select), self._source_filtered(), join, where, self.id
        )
        schema = self.raw_schema()
        emb_at = 2 + len(lay.text_fields)
        with self.conn.transaction(), self.conn.cursor(name=f"backfill_read_{lay.dataset}") as cursor:
            # plan the cursor for the whole result, not its first rows: a filtered read (only the rows
            # needing work) would otherwise walk the id index and test every row on the way
            self.conn.execute("SET LOCAL cursor_tuple_fraction = 1.0")
            cursor.itersize = batch_size
            cursor.execute(query, params)
            while rows := cursor.fetchmany(batch_size):
                columns = list(zip(*rows, strict=True))
                arrays = [pa.array(columns[0], schema.field("id").type), pa.array(columns[1], pa.string())]
                arrays += [pa.array(c, pa.string()) for c in columns[2:emb_at]]
                vectors, errors = self.vector_columns(columns[emb_at], decode_vector)
                arrays.append(vectors)
                arrays += [pa.array(c, pa.string()) for c in columns[emb_at + 1 :]]
                arrays.append(errors)
                arrays.append(pa.nulls(len(rows), pa.string()))  # the server's encoding guarantees the text
                yield pa.RecordBatch.from_arrays(arrays, schema=schema)

    def write_results(self, results: pa.Table, batch_size: int) -> WriteStats:
        return write_results(self, results, batch_size)
