"""The embedded default store's rows: a local SQLite file (standard library only).

Embeddings are stored as JSON arrays in TEXT columns (like a ``jsonb`` column), or as little-endian
float32 BLOBs when the column is declared ``BLOB``: the declared type decides, as the catalog does in
Postgres.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from ..rows import parse_float_list
from .base import (
    FAILURES_TABLE,
    PartitionSpec,
    RowStore,
    SchemaError,
    StoreError,
    WriteStats,
    encode_skills,
    write_splitting,
)
from .groups import GroupQueries, WorkTest, sqlite_dialect
from .layout import TableLayout
from .sql_text import register_sqlite_functions


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def sqlite_path(url: str) -> Path:
    """``sqlite:///relative.db`` is relative to the working directory, ``sqlite:////abs.db`` absolute."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or parts.netloc:
        raise StoreError(f"not a SQLite URL (expected sqlite:///path): {url}")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not path:
        raise StoreError("the SQLite URL has no file path")
    return Path(path)


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taken at once: it serialises every process sharing the file."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def table_columns(conn: sqlite3.Connection, table: str) -> dict[str, str]:
    rows = conn.execute(f"PRAGMA table_info({quote(table)})").fetchall()
    return {r[1]: (r[2] or "").upper() for r in rows}


class Undecodable(str):
    """Text stored as bytes that are not UTF-8, shown with replacement characters; its row is not embedded."""


def decode_text(data: bytes) -> str:
    """The connection's text factory: one row's bad bytes must not fail the whole read."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return Undecodable(data.decode("utf-8", errors="replace"))


def _text_error(fields: tuple[str, ...], values: tuple[object, ...]) -> str | None:
    bad = [f for f, v in zip(fields, values, strict=True) if isinstance(v, Undecodable)]
    return f"column {', '.join(bad)} holds bytes that are not UTF-8" if bad else None


def decode_vector(value: object) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, bytes | memoryview):
        return np.frombuffer(value, dtype="<f4")
    text = str(value).strip()
    if not text.startswith("[") or not text.endswith("]"):
        raise ValueError(f"embedding is neither a JSON array nor a float32 blob: {text[:40]!r}")
    return parse_float_list(text[1:-1])


class SQLiteRows(RowStore):
    def __init__(self, layout: TableLayout, conn: sqlite3.Connection, path: Path):
        super().__init__(layout)
        if layout.source.schema or layout.target.schema:
            raise StoreError(f"dataset '{layout.dataset}': 'schema' is not supported for SQLite databases")
        self.conn = conn
        self.path = path
        self.src = quote(layout.source.name)
        self.dst = quote(layout.target.name)
        self.dst_id = quote(layout.target_id_column)
        self.id = quote(layout.id_column)
        register_sqlite_functions(conn, layout.text)

    # -- schema ----------------------------------------------------------------------------------
    def missing_columns(self) -> list[str]:
        lay = self.layout
        source_cols = table_columns(self.conn, lay.source.name)
        if not source_cols:
            raise SchemaError(f"dataset '{lay.dataset}': table {lay.source} does not exist in {self.path}")
        absent = [c for c in lay.needed_source_columns if c not in source_cols]
        if absent:
            raise SchemaError(f"dataset '{lay.dataset}': table {lay.source} has no column(s) {', '.join(absent)}")
        target_cols = table_columns(self.conn, lay.target.name)
        if not target_cols:
            return [f"{lay.target} (table)"]
        return [f"{lay.target}.{c}" for c in lay.result_columns if c not in target_cols]

    def integer_ids(self) -> bool:
        """SQLite's own rule: a column whose declared type contains INT holds integers."""
        return "INT" in table_columns(self.conn, self.layout.source.name).get(self.layout.id_column, "INT")

    def queries(self) -> GroupQueries:
        lay = self.layout
        self.check_keys()
        target = table_columns(self.conn, lay.target.name)
        failures = FAILURES_TABLE if table_columns(self.conn, FAILURES_TABLE) else None
        return GroupQueries(
            lay,
            sqlite_dialect(target.get(lay.embedding_column, "TEXT")),
            lambda query, params: self.conn.execute(query, list(params)).fetchall(),
            self._source_filtered(),
            self.dst,
            failures,
            self.integer_ids(),
        )

    def delete_orphans(self, part: PartitionSpec) -> int:
        statement, params = self.queries().orphans_statement(part)
        with immediate(self.conn):
            return self.conn.execute(statement, params).rowcount

    def check_keys(self) -> None:
        lay = self.layout
        declared = table_columns(self.conn, lay.source.name).get(lay.id_column)
        if declared is None:
            raise SchemaError(f"dataset '{lay.dataset}': table {lay.source} has no column(s) {lay.id_column}")
        if lay.partition_kind == "id_range" and declared and "INT" not in declared:
            raise SchemaError(
                f"dataset '{lay.dataset}': id column {lay.source}.{lay.id_column} has type {declared}; partitions "
                "by id range need an INTEGER column; for other keys use partitioning: {kind: hash, buckets: 16}"
            )

    def check_columns(self) -> None:
        lay = self.layout
        self.check_keys()
        if lay.separate and not self._unique(lay.target.name, lay.target_id_column):
            raise SchemaError(
                f"dataset '{lay.dataset}': column {lay.target}.{lay.target_id_column} has no primary key or unique "
                "index; results are upserted by it, so add one"
            )

    def _unique(self, table: str, column: str) -> bool:
        """Whether ``column`` alone is the primary key of ``table`` or has a unique index."""
        primary = [r[1] for r in self.conn.execute(f"PRAGMA table_info({quote(table)})") if r[5]]
        if primary == [column]:
            return True
        unique = [r[1] for r in self.conn.execute(f"PRAGMA index_list({quote(table)})") if r[2]]
        return any([r[2] for r in self.conn.execute(f"PRAGMA index_info({quote(i)})")] == [column] for i in unique)

    def add_missing_columns(self) -> None:
        lay = self.layout
        existing = table_columns(self.conn, lay.target.name)
        if not existing:
            cols = ", ".join(f"{quote(c)} TEXT" for c in lay.result_columns)
            key_type = "INTEGER" if self.integer_ids() else "TEXT"
            self.conn.execute(f"CREATE TABLE {self.dst} ({self.dst_id} {key_type} PRIMARY KEY, {cols})")
            return
        for column in lay.result_columns:
            if column not in existing:
                self.conn.execute(f"ALTER TABLE {self.dst} ADD COLUMN {quote(column)} TEXT")

    # -- partitions ------------------------------------------------------------------------------
    def _source_filtered(self) -> str:
        where = f" WHERE ({self.layout.row_filter})" if self.layout.row_filter else ""
        return f"(SELECT * FROM {self.src}{where}) AS s"

    # -- rows ------------------------------------------------------------------------------------
    def read_batches(
        self, part: PartitionSpec, batch_size: int, pending: WorkTest | None = None
    ) -> Iterator[pa.RecordBatch]:
        lay = self.layout
        r = "r" if lay.separate else "s"
        select = [f"s.{self.id}", f"s.{quote(lay.archive_column)}" if lay.archive_column else "NULL"]
        select += [f"s.{quote(f)}" for f in lay.text_fields]
        # result columns not added yet (a plan before `migrate`) read as NULL: every row then needs work
        present = table_columns(self.conn, lay.target.name)
        select += [f"{r}.{quote(c)}" if c in present else "NULL" for c in lay.stored_columns]
        join = f" LEFT JOIN {self.dst} AS r ON r.{self.dst_id} = s.{self.id}" if lay.separate and present else ""
        where, params = self.where_clause(part, pending)
        sql = f"SELECT {', '.join(select)} FROM {self._source_filtered()}{join}{where} ORDER BY s.{self.id}"
        schema = self.raw_schema()
        integer_ids = pa.types.is_integer(schema.field("id").type)
        emb_at = 2 + len(lay.text_fields)
        cursor = self.conn.execute(sql, params)
        while rows := cursor.fetchmany(batch_size):
            columns = list(zip(*rows, strict=True))
            if integer_ids:
                odd = next((i for i in columns[0] if not isinstance(i, int)), None)
                if odd is not None:
                    raise SchemaError(
                        f"dataset '{lay.dataset}': id column {lay.source}.{lay.id_column} holds {odd!r}; partitions "
                        "by id range need integer ids; for other keys use partitioning: {kind: hash, buckets: 16}"
                    )
                ids = pa.array(columns[0], pa.int64())
            else:
                ids = pa.array([None if i is None else str(i) for i in columns[0]], pa.string())
            arrays = [ids, pa.array([None if a is None else str(a) for a in columns[1]], pa.string())]
            arrays += [pa.array([None if v is None else str(v) for v in c], pa.string()) for c in columns[2:emb_at]]
            text_errors = [_text_error(lay.text_fields, values) for values in zip(*columns[2:emb_at], strict=True)]
            vectors, errors = self.vector_columns(columns[emb_at], decode_vector)
            arrays.append(vectors)
            arrays += [pa.array(c, pa.string()) for c in columns[emb_at + 1 : emb_at + 3]]
            provenance_at = emb_at + 3 + len(lay.enrichment_columns)
            enrichment = columns[emb_at + 3 : provenance_at]
            arrays += [pa.array([encode_skills(v) for v in c], pa.string()) for c in enrichment]
            arrays += [pa.array(c, pa.string()) for c in columns[provenance_at:]]
            arrays.append(errors)
            arrays.append(pa.array(text_errors, pa.string()))
            yield pa.RecordBatch.from_arrays(arrays, schema=schema)

    def write_results(self, results: pa.Table, batch_size: int) -> WriteStats:
        lay = self.layout
        mapping = lay.result_mapping(set(results.column_names))
        if not mapping:
            return WriteStats()
        as_blob = "BLOB" in table_columns(self.conn, lay.target.name).get(lay.embedding_column, "")
        columns = {name: results.column(src) for name, src in mapping.items()}
        ids = results.column("id").to_pylist()
        names = list(columns)
        if lay.separate:
            sql = (
                f"INSERT INTO {self.dst} ({self.dst_id}, {', '.join(quote(c) for c in names)}) "
                f"VALUES (?{', ?' * len(names)}) ON CONFLICT ({self.dst_id}) DO UPDATE SET "
                + ", ".join(f"{quote(c)} = COALESCE(excluded.{quote(c)}, {self.dst}.{quote(c)})" for c in names)
            )
        else:
            sql = (
                f"UPDATE {self.dst} SET "
                + ", ".join(f"{quote(c)} = COALESCE(?, {quote(c)})" for c in names)
                + f" WHERE {self.dst_id} = ?"
            )
        stats = WriteStats()
        for start in range(0, len(ids), batch_size):
            stop = min(start + batch_size, len(ids))
            values = []
            for name in names:
                chunk = columns[name].slice(start, stop - start)
                if name == lay.embedding_column:
                    values.append(_encode_vectors(chunk, as_blob))
                else:
                    values.append([None if v is None else str(v) for v in chunk.to_pylist()])
            rows = list(zip(*values, strict=True))
            params: Sequence[tuple] = (
                [(i, *r) for i, r in zip(ids[start:stop], rows, strict=True)]
                if lay.separate
                else [(*r, i) for i, r in zip(ids[start:stop], rows, strict=True)]
            )

            def write(a: int, b: int, params: Sequence[tuple] = params, offset: int = start) -> int:
                with immediate(self.conn):
                    return self.conn.executemany(sql, params[a - offset : b - offset]).rowcount

            stats.add(write_splitting(write, start, stop, ids, (sqlite3.IntegrityError,), str))
        return stats


def _encode_vectors(chunk: pa.Array | pa.ChunkedArray, as_blob: bool) -> list:
    if isinstance(chunk, pa.ChunkedArray):
        chunk = chunk.combine_chunks()
    valid = chunk.is_valid().to_numpy(zero_copy_only=False)
    dim = chunk.type.list_size
    matrix = chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    rows = iter(matrix)
    if as_blob:
        return [next(rows).astype("<f4").tobytes() if ok else None for ok in valid]
    return [json.dumps(np.round(next(rows).astype(np.float64), 7).tolist()) if ok else None for ok in valid]
