"""Writing results to Postgres: batches staged by ``COPY ... FORMAT BINARY``, applied in one statement.

Each batch is one transaction: staged into a temporary table, then applied by one ``UPDATE ... FROM``
(in place) or ``INSERT ... ON CONFLICT DO UPDATE`` (separate table) touching only the result columns.
Batches hold disjoint ids, so ``write_concurrency`` of them run at once on their own connections: the
client encodes one batch while the server applies another.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import sql
from psycopg.types.json import Jsonb

from .base import ConnectionLostError, DatabaseTimeoutError, StoreError, WriteStats, encode_skills, write_splitting
from .postgres_catalog import clean_error, connect

if TYPE_CHECKING:
    from .postgres_rows import PostgresRows

Convert = Callable[[object], object]
# what the database says about one row's values (too long, a check or constraint refused): split to find it
REJECTED_VALUES: tuple[type[Exception], ...] = (psycopg.errors.DataError, psycopg.errors.IntegrityError)


def _json_floats(v: np.ndarray) -> list[float]:
    return np.round(v.astype(np.float64), 7).tolist()


def column_adapter(rows: PostgresRows, column: str, source: str) -> tuple[str, Convert]:
    """The COPY type and the value converter for writing ``source`` results into ``column``."""
    kind = rows.target_columns()[column]
    if source == "embedding":
        vector_kind = kind.vector_kind
        if vector_kind == "vector":
            return "vector", lambda v: v
        if vector_kind == "halfvec":
            from pgvector import HalfVector

            return "halfvec", lambda v: HalfVector(v)
        if vector_kind == "real[]":
            return "float4[]", lambda v: v.tolist()
        if vector_kind == "double precision[]":
            return "float8[]", lambda v: v.astype(np.float64).tolist()
        if kind.typname in ("jsonb", "json"):
            return kind.typname, lambda v: Jsonb(_json_floats(v))
        return "text", lambda v: json.dumps(_json_floats(v))
    if kind.typname in ("timestamptz", "timestamp", "date"):
        return kind.typname, lambda v: datetime.fromisoformat(str(v))
    if source.endswith(":skills"):
        if kind.typname in ("jsonb", "json"):
            return kind.typname, lambda v: Jsonb(json.loads(str(v)))
        if kind.category == "A":
            return "text[]", lambda v: json.loads(str(v))
    return "text", str


def column_values(column: pa.ChunkedArray) -> list:
    """Python values of a results column; vectors as float32 numpy rows (``None`` for null)."""
    if pa.types.is_fixed_size_list(column.type):
        array = column.combine_chunks()
        valid = array.is_valid().to_numpy(zero_copy_only=False)
        matrix = array.flatten().to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
        rows = iter(matrix)
        return [next(rows) if ok else None for ok in valid]
    return [None if v is None else v if isinstance(v, str) else encode_skills(v) for v in column.to_pylist()]


def write_results(rows: PostgresRows, results: pa.Table, batch_size: int) -> WriteStats:
    lay = rows.layout
    mapping = lay.result_mapping(set(results.column_names))
    stats = WriteStats()
    if not mapping or results.num_rows == 0:
        return stats
    names = list(mapping)
    adapters = [column_adapter(rows, name, mapping[name]) for name in names]
    key_type = rows.target_columns()[lay.target_id_column]
    integer_ids = pa.types.is_integer(results.schema.field("id").type)
    # Other keys (uuid, text, …) are staged as their text and cast to the key's type when applied.
    id_type = key_type.typname if integer_ids else "text"
    staged_id = sql.SQL("s.{}").format(rows.dst_id)
    if not integer_ids:
        staged_id = sql.SQL("s.{}::{}").format(rows.dst_id, sql.SQL(key_type.formatted))
    stage = sql.Identifier(f"backfill_stage_{lay.dataset}")
    cols = sql.SQL(", ").join(sql.Identifier(n) for n in names)
    create_stage = sql.SQL(
        "CREATE TEMP TABLE IF NOT EXISTS {} ON COMMIT DELETE ROWS AS SELECT {}{} AS {}, {} FROM {} LIMIT 0"
    ).format(stage, rows.dst_id, sql.SQL("" if integer_ids else "::text"), rows.dst_id, cols, rows.dst)
    if lay.separate:
        sets = sql.SQL(", ").join(
            sql.SQL("{c} = COALESCE(EXCLUDED.{c}, t.{c})").format(c=sql.Identifier(n)) for n in names
        )
        apply = sql.SQL(
            "INSERT INTO {dst} AS t ({id}, {cols}) SELECT {sid}, {cols} FROM {stage} AS s "
            "ON CONFLICT ({id}) DO UPDATE SET {sets}"
        ).format(dst=rows.dst, id=rows.dst_id, sid=staged_id, cols=cols, stage=stage, sets=sets)
    else:
        sets = sql.SQL(", ").join(sql.SQL("{c} = COALESCE(s.{c}, t.{c})").format(c=sql.Identifier(n)) for n in names)
        apply = sql.SQL("UPDATE {dst} AS t SET {sets} FROM {stage} AS s WHERE t.{id} = {sid}").format(
            dst=rows.dst, stage=stage, id=rows.dst_id, sid=staged_id, sets=sets
        )
    copy_sql = sql.SQL("COPY {} ({}, {}) FROM STDIN (FORMAT BINARY)").format(stage, rows.dst_id, cols)
    types = [id_type] + [t for t, _ in adapters]
    ids = results.column("id").to_pylist()
    columns = [column_values(results.column(mapping[n])) for n in names]
    batches = [(n, s, min(s + batch_size, len(ids))) for n, s in enumerate(range(0, len(ids), batch_size), 1)]

    def write_batch(conn: psycopg.Connection, start: int, stop: int) -> int:
        with conn.transaction(), conn.cursor() as cursor:
            with cursor.copy(copy_sql) as copy:
                copy.set_types(types)
                for i in range(start, stop):
                    row = [ids[i]]
                    for (_, convert), values in zip(adapters, columns, strict=True):
                        value = values[i]
                        row.append(None if value is None else convert(value))
                    copy.write_row(row)
            cursor.execute(apply)
            return cursor.rowcount

    workers = min(rows.write_concurrency, len(batches))
    connections = [rows.conn] + [connect(rows.url, lay.dataset, rows.timeouts) for _ in range(workers - 1)]
    lock = threading.Lock()
    pending = iter(batches)
    failure: list[tuple[int, int, int, Exception]] = []

    def worker(conn: psycopg.Connection) -> None:
        conn.execute(create_stage)
        while not failure:
            with lock:
                batch = next(pending, None)
            if batch is None:
                return
            number, start, stop = batch
            try:
                done = write_splitting(
                    lambda a, b: write_batch(conn, a, b), start, stop, ids, REJECTED_VALUES, clean_error
                )
            except psycopg.Error as exc:
                failure.append((number, start, stop, exc))
                return
            with lock:
                stats.add(done)

    try:
        if workers == 1:
            worker(rows.conn)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(worker, connections))
    finally:
        for conn in connections[1:]:
            conn.close()
    if failure:
        number, start, stop, exc = failure[0]
        where = f"batch {number} of {len(batches)} (row ids {ids[start]}..{ids[stop - 1]})"
        if isinstance(exc, psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled):
            raise DatabaseTimeoutError(
                f"dataset '{lay.dataset}': writing {where} timed out ({clean_error(exc)}; lock_timeout_seconds "
                f"{rows.timeouts.lock_seconds:g}, statement_timeout_seconds {rows.timeouts.statement_seconds:g}). "
                f"That batch was rolled back; {stats.rows_written} rows of other batches are committed. "
                "Another session holds a lock on these rows, or the write is slow; the retry picks the rest up."
            ) from None
        if isinstance(exc, psycopg.OperationalError):
            raise ConnectionLostError(
                f"dataset '{lay.dataset}': lost the database connection while writing {where}: {clean_error(exc)}. "
                f"That batch was rolled back; {stats.rows_written} rows of other batches are committed. "
                "Re-run the partition: it picks up the rows still needing work."
            ) from None
        raise StoreError(
            f"dataset '{lay.dataset}': the database rejected {where}: {clean_error(exc)}. That batch was rolled "
            f"back; {stats.rows_written} rows of other batches are committed."
        ) from None
    return stats
