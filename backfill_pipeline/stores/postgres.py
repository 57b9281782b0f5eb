"""The production store: PostgreSQL through psycopg 3, with or without pgvector.

- Reads stream the partition through a server-side cursor, ``batch_size`` rows at a time.
- Writes stage each batch with ``COPY ... FORMAT BINARY`` into a temporary table and apply it with one
  ``UPDATE ... FROM`` (in place) or ``INSERT ... ON CONFLICT DO UPDATE`` (separate table), one
  transaction per batch: a batch is written whole or not at all.
- The embedding column's type is read from the catalog: pgvector ``vector(n)``/``halfvec(n)``,
  ``real[]``/``double precision[]``, ``jsonb``/``json`` holding an array, or JSON text.
- Identifiers are always composed with ``psycopg.sql.Identifier``; the dataset's ``row_filter`` is the
  only raw SQL, and the config documents it as trusted.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import sql
from psycopg.types.json import Jsonb

from ..config import DatasetConfig
from ..rows import vector_array
from .base import (
    BUDGET_TABLE,
    CACHE_TABLE,
    FAILURES_TABLE,
    LEASES_TABLE,
    OWN_TABLES,
    ConnectionLostError,
    Failure,
    PartitionSpec,
    SchemaError,
    Store,
    StoreError,
    WriteStats,
    encode_skills,
    result_column_mapping,
    utc_now,
)

_DIM = re.compile(r"\((\d+)\)")


@dataclass(frozen=True)
class ColumnType:
    """A column's type as the catalog reports it."""

    formatted: str  # e.g. "vector(768)", "real[]", "jsonb", "timestamp with time zone"
    typname: str  # e.g. "vector", "_float4", "jsonb", "timestamptz"
    category: str  # pg_type.typcategory: "A" array, "S" string, "U" user-defined, ...

    @property
    def dimension(self) -> int | None:
        match = _DIM.search(self.formatted) if self.typname in ("vector", "halfvec") else None
        return int(match.group(1)) if match else None

    @property
    def vector_kind(self) -> str | None:
        return {
            "vector": "vector",
            "halfvec": "halfvec",
            "_float4": "real[]",
            "_float8": "double precision[]",
            "jsonb": "json",
            "json": "json",
            "text": "json",
            "varchar": "json",
        }.get(self.typname)


def _decode_vector(text: str | None) -> np.ndarray | None:
    """Any supported column's text form ('[1,2]', '{1,2}', JSON) as float32; ``None`` for NULL/JSON null."""
    if text is None or text == "null":
        return None
    body = text.strip()
    if len(body) < 2 or body[0] not in "[{" or body[-1] not in "]}":
        raise ValueError(f"not an array: {body[:40]!r}")
    return np.fromstring(body[1:-1], sep=",", dtype=np.float32)


class PostgresStore(Store):
    def __init__(self, name: str, dataset: DatasetConfig, url: str):
        super().__init__(name, dataset)
        url = url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.url = url
        try:
            self.conn = psycopg.connect(url, autocommit=True, connect_timeout=15)
        except psycopg.OperationalError as exc:
            raise ConnectionLostError(f"dataset '{name}': cannot connect to the database: {_clean(exc)}") from None
        self.has_pgvector = (
            self.conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is not None
        )
        if self.has_pgvector:
            from pgvector.psycopg import register_vector

            register_vector(self.conn)
        d = dataset
        self.schema = d.schema_name
        self.src = self._ident(d.table, d.schema_name)
        self.separate = d.target.mode == "table"
        self.dst_table = d.target.table if self.separate else d.table
        self.dst_schema = d.target.schema_name if self.separate else d.schema_name
        self.dst = self._ident(self.dst_table, self.dst_schema)  # type: ignore[arg-type]
        self.id = sql.Identifier(d.id_column)
        self.dst_id = sql.Identifier(d.target.id_column if self.separate else d.id_column)
        self.failures_table = self._ident(FAILURES_TABLE, self.dst_schema)
        self.leases_table = self._ident(LEASES_TABLE, self.dst_schema)
        self.cache_table = self._ident(CACHE_TABLE, self.dst_schema)
        self.budget_table = self._ident(BUDGET_TABLE, self.dst_schema)
        self._side_conn: psycopg.Connection | None = None  # for the engine's worker threads
        self._side_lock = threading.Lock()
        self._types: dict[str, dict[str, ColumnType]] = {}

    @staticmethod
    def _ident(table: str, schema: str | None) -> sql.Identifier:
        return sql.Identifier(schema, table) if schema else sql.Identifier(table)

    def close(self) -> None:
        if self._side_conn is not None:
            self._side_conn.close()
        self.conn.close()

    def _side(self) -> psycopg.Connection:
        if self._side_conn is None or self._side_conn.closed:
            self._side_conn = psycopg.connect(self.url, autocommit=True, connect_timeout=15)
        return self._side_conn

    # -- catalog ---------------------------------------------------------------------------------
    def _columns(self, table: str, schema: str | None, refresh: bool = False) -> dict[str, ColumnType]:
        qualified = self._ident(table, schema).as_string(self.conn)
        if refresh or qualified not in self._types:
            rows = self.conn.execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typname, t.typcategory "
                "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
                "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
                [qualified],
            ).fetchall()
            self._types[qualified] = {r[0]: ColumnType(r[1], r[2], r[3]) for r in rows}
        return self._types[qualified]

    def _table_exists(self, table: str, schema: str | None) -> bool:
        qualified = self._ident(table, schema).as_string(self.conn)
        return self.conn.execute("SELECT to_regclass(%s)", [qualified]).fetchone()[0] is not None

    def embedding_type(self) -> ColumnType:
        column = self.dataset.embedding.column
        found = self._columns(self.dst_table, self.dst_schema).get(column)  # type: ignore[arg-type]
        if found is None:
            raise SchemaError(f"dataset '{self.name}': column {self.dst_table}.{column} does not exist")
        return found

    def missing_columns(self) -> list[str]:
        d = self.dataset
        source = self._columns(d.table, d.schema_name, refresh=True)
        if not source:
            raise SchemaError(f"dataset '{self.name}': table {self.src.as_string(self.conn)} does not exist")
        needed = [d.id_column, *d.text.fields] + ([d.archive_column] if d.archive_column else [])
        absent = [c for c in needed if c not in source]
        if absent:
            raise SchemaError(f"dataset '{self.name}': table {d.table} has no column(s) {', '.join(absent)}")
        missing: list[str] = []
        target = self._columns(self.dst_table, self.dst_schema, refresh=True)  # type: ignore[arg-type]
        if not target:
            missing.append(f"{self.dst_table} (table)")
        else:
            missing += [f"{self.dst_table}.{c}" for c in d.result_columns if c not in target]
        for table in OWN_TABLES:
            if not self._table_exists(table, self.dst_schema):
                missing.append(f"{table} (table)")
        return missing

    def check_schema(self) -> None:
        super().check_schema()
        emb = self.embedding_type()
        column = f"{self.dst_table}.{self.dataset.embedding.column}"
        if emb.vector_kind is None:
            raise SchemaError(
                f"dataset '{self.name}': column {column} has type {emb.formatted}; supported are vector(n), "
                "halfvec(n), real[], double precision[], jsonb, json and text"
            )
        configured = self.dataset.embedding.dimension
        if emb.dimension is not None and emb.dimension != configured:
            raise SchemaError(
                f"dataset '{self.name}': column {column} is {emb.formatted} but embedding.dimension is "
                f"{configured}; set embedding.dimension to {emb.dimension} or change the column's type"
            )
        for field, col in self.dataset.enrichment_columns.items():
            kind = self._columns(self.dst_table, self.dst_schema)[col]  # type: ignore[arg-type]
            if field == "skills" and kind.typname not in ("jsonb", "json", "_text", "_varchar", "text", "varchar"):
                raise SchemaError(
                    f"dataset '{self.name}': column {self.dst_table}.{col} has type {kind.formatted}; skills "
                    "need jsonb, json, text[] or text"
                )

    def _result_column_type(self, column: str) -> str:
        d = self.dataset
        if column == d.embedding.column:
            return f"vector({d.embedding.dimension})" if self.has_pgvector else "real[]"
        if column in (d.bookkeeping.embedded_at, d.bookkeeping.enriched_at):
            return "timestamptz"
        if column == d.enrichment_columns.get("skills"):
            return "jsonb"
        return "text"

    def migrate(self) -> list[str]:
        added = self.missing_columns()
        if not added:
            return []
        d = self.dataset
        with self.conn.transaction():
            if not self._table_exists(self.dst_table, self.dst_schema):  # type: ignore[arg-type]
                source_id = self._columns(d.table, d.schema_name)[d.id_column].formatted
                cols = [
                    sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(self._result_column_type(c)))
                    for c in d.result_columns
                ]
                self.conn.execute(
                    sql.SQL("CREATE TABLE {} ({} {} PRIMARY KEY, {})").format(
                        self.dst, self.dst_id, sql.SQL(source_id), sql.SQL(", ").join(cols)
                    )
                )
            existing = self._columns(self.dst_table, self.dst_schema, refresh=True)  # type: ignore[arg-type]
            for column in d.result_columns:
                if column not in existing:
                    self.conn.execute(
                        sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                            self.dst, sql.Identifier(column), sql.SQL(self._result_column_type(column))
                        )
                    )
            self.conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (dataset text NOT NULL, row_id text NOT NULL, stage text NOT NULL, "
                    "error_class text NOT NULL, message text NOT NULL, attempts integer NOT NULL DEFAULT 1, "
                    "first_failed_at timestamptz NOT NULL, last_failed_at timestamptz NOT NULL, "
                    "requeued boolean NOT NULL DEFAULT false, PRIMARY KEY (dataset, row_id, stage))"
                ).format(self.failures_table)
            )
            self.conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, value bytea NOT NULL, "
                    "created_at timestamptz NOT NULL DEFAULT now())"
                ).format(self.cache_table)
            )
            self.conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, request_tat double precision NOT NULL, "
                    "token_tat double precision NOT NULL)"
                ).format(self.budget_table)
            )
            self.conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (dataset text NOT NULL, partition_key text NOT NULL, "
                    "run_id text NOT NULL, acquired_at timestamptz NOT NULL, PRIMARY KEY (dataset, partition_key))"
                ).format(self.leases_table)
            )
        self._types.clear()
        return added

    # -- partitions ------------------------------------------------------------------------------
    def _source_filtered(self) -> sql.Composable:
        if self.dataset.row_filter:
            # Trusted SQL from the config file: the one place raw SQL enters a statement.
            where = sql.SQL(" WHERE ({})").format(sql.SQL(self.dataset.row_filter))  # type: ignore[arg-type]
        else:
            where = sql.SQL("")
        return sql.SQL("(SELECT * FROM {}{}) AS s").format(self.src, where)

    def id_buckets(self, width: int, after_id: int | None = None) -> list[tuple[int, int]]:
        where = sql.SQL(" WHERE s.{} > %s").format(self.id) if after_id is not None else sql.SQL("")
        query = sql.SQL(
            "SELECT s.{id}::bigint / %s AS bucket, max(s.{id})::bigint FROM {src}{where} GROUP BY 1 ORDER BY 1"
        ).format(id=self.id, src=self._source_filtered(), where=where)
        params = [width] + ([after_id] if after_id is not None else [])
        return [(int(b), int(m)) for b, m in self.conn.execute(query, params)]

    def archive_groups(self, after_id: int | None = None) -> list[tuple[str, int]]:
        archive = sql.Identifier(self.dataset.archive_column or "")
        where = sql.SQL(" AND s.{} > %s").format(self.id) if after_id is not None else sql.SQL("")
        query = sql.SQL(
            "SELECT s.{a}::text, max(s.{id})::bigint FROM {src} WHERE s.{a} IS NOT NULL{where} "
            "GROUP BY s.{a} ORDER BY min(s.{id})"
        ).format(a=archive, id=self.id, src=self._source_filtered(), where=where)
        params = [after_id] if after_id is not None else []
        return [(str(a), int(m)) for a, m in self.conn.execute(query, params)]

    # -- rows ------------------------------------------------------------------------------------
    def _where(self, part: PartitionSpec | None) -> tuple[sql.Composable, list]:
        clauses: list[sql.Composable] = []
        params: list = []
        if part is not None and part.id_range is not None:
            clauses.append(sql.SQL("s.{} BETWEEN %s AND %s").format(self.id))
            params += list(part.id_range)
        if part is not None and part.archive is not None:
            clauses.append(sql.SQL("s.{}::text = %s").format(sql.Identifier(self.dataset.archive_column or "")))
            params.append(part.archive)
        if not clauses:
            return sql.SQL(""), params
        return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(clauses), params

    def _as_text(self, alias: str, column: str, table: str, schema: str | None) -> sql.Composable:
        kind = self._columns(table, schema)[column]
        ref = sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(column))
        if kind.category == "A" and kind.typname not in ("_float4", "_float8"):
            return sql.SQL("array_to_json({})::text").format(ref)
        return sql.SQL("{}::text").format(ref)

    def read_batches(self, part: PartitionSpec, batch_size: int) -> Iterator[pa.RecordBatch]:
        d = self.dataset
        r = "r" if self.separate else "s"
        dst_table, dst_schema = self.dst_table, self.dst_schema
        select: list[sql.Composable] = [sql.SQL("s.{}::bigint").format(self.id)]
        select.append(
            sql.SQL("s.{}::text").format(sql.Identifier(d.archive_column)) if d.archive_column else sql.SQL("NULL")
        )
        select += [sql.SQL("s.{}::text").format(sql.Identifier(f)) for f in d.text.fields]
        for column in (d.embedding.column, d.bookkeeping.content_hash, d.bookkeeping.model):
            select.append(self._as_text(r, column, dst_table, dst_schema))  # type: ignore[arg-type]
        for column in d.enrichment_columns.values():
            select.append(self._as_text(r, column, dst_table, dst_schema))  # type: ignore[arg-type]
        join = (
            sql.SQL(" LEFT JOIN {} AS r ON r.{} = s.{}").format(self.dst, self.dst_id, self.id)
            if self.separate
            else sql.SQL("")
        )
        where, params = self._where(part)
        query = sql.SQL("SELECT {} FROM {}{}{} ORDER BY s.{}").format(
            sql.SQL(", ").join(select), self._source_filtered(), join, where, self.id
        )
        schema = self.raw_schema()
        n_text = len(d.text.fields)
        emb_at = 2 + n_text
        with self.conn.transaction(), self.conn.cursor(name=f"backfill_read_{self.name}") as cursor:
            cursor.itersize = batch_size
            cursor.execute(query, params)
            while rows := cursor.fetchmany(batch_size):
                columns = list(zip(*rows, strict=True))
                vectors = []
                for row_id, value in zip(columns[0], columns[emb_at], strict=True):
                    try:
                        vectors.append(_decode_vector(value))
                    except ValueError as exc:
                        raise StoreError(
                            f"dataset '{self.name}', row id {row_id}, column {d.embedding.column}: {exc}"
                        ) from None
                arrays = [pa.array(columns[0], pa.int64()), pa.array(columns[1], pa.string())]
                arrays += [pa.array(c, pa.string()) for c in columns[2:emb_at]]
                arrays.append(vector_array(vectors))
                arrays += [pa.array(c, pa.string()) for c in columns[emb_at + 1 :]]
                yield pa.RecordBatch.from_arrays(arrays, schema=schema)

    # -- writes ----------------------------------------------------------------------------------
    def _adapter(self, column: str, source: str) -> tuple[str, Callable[[object], object]]:
        """The COPY type and the value converter for writing ``source`` results into ``column``."""
        kind = self._columns(self.dst_table, self.dst_schema)[column]  # type: ignore[arg-type]
        if source == "embedding":
            vector_kind = kind.vector_kind
            if vector_kind == "vector":
                return "vector", lambda v: v
            if vector_kind == "halfvec":
                from pgvector import HalfVector

                return "halfvec", HalfVector
            if vector_kind == "real[]":
                return "float4[]", lambda v: v.tolist()
            if vector_kind == "double precision[]":
                return "float8[]", lambda v: v.astype(np.float64).tolist()
            if kind.typname in ("jsonb", "json"):
                return kind.typname, lambda v: Jsonb(np.round(v.astype(np.float64), 7).tolist())
            return "text", lambda v: json.dumps(np.round(v.astype(np.float64), 7).tolist())
        if kind.typname in ("timestamptz", "timestamp", "date"):
            return kind.typname, datetime.fromisoformat  # type: ignore[return-value]
        if source.endswith(":skills"):
            if kind.typname in ("jsonb", "json"):
                return kind.typname, lambda v: Jsonb(json.loads(v))  # type: ignore[arg-type]
            if kind.category == "A":
                return "text[]", json.loads  # type: ignore[return-value]
        return "text", str

    def write_results(self, results: pa.Table, batch_size: int) -> WriteStats:
        """Write in batches of ``batch_size`` rows, each one transaction: staged by COPY BINARY into a
        temporary table, applied by one UPDATE ... FROM (or INSERT ... ON CONFLICT). Batches hold disjoint
        ids, so ``write_concurrency`` of them run at once on their own connections: the client encodes one
        batch while the server applies another."""
        mapping = result_column_mapping(self.dataset, results)
        stats = WriteStats()
        if not mapping or results.num_rows == 0:
            return stats
        names = list(mapping)
        adapters = [self._adapter(name, mapping[name]) for name in names]
        id_column = self.dataset.target.id_column if self.separate else self.dataset.id_column
        id_type = self._columns(self.dst_table, self.dst_schema)[id_column].typname  # type: ignore[arg-type]
        stage = sql.Identifier(f"backfill_stage_{self.name}")
        cols = sql.SQL(", ").join(sql.Identifier(n) for n in names)
        create_stage = sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {} ON COMMIT DELETE ROWS AS SELECT {}, {} FROM {} LIMIT 0"
        ).format(stage, self.dst_id, cols, self.dst)
        if self.separate:
            sets = sql.SQL(", ").join(
                sql.SQL("{c} = COALESCE(EXCLUDED.{c}, t.{c})").format(c=sql.Identifier(n)) for n in names
            )
            apply = sql.SQL(
                "INSERT INTO {dst} AS t ({id}, {cols}) SELECT {id}, {cols} FROM {stage} "
                "ON CONFLICT ({id}) DO UPDATE SET {sets}"
            ).format(dst=self.dst, id=self.dst_id, cols=cols, stage=stage, sets=sets)
        else:
            sets = sql.SQL(", ").join(
                sql.SQL("{c} = COALESCE(s.{c}, t.{c})").format(c=sql.Identifier(n)) for n in names
            )
            apply = sql.SQL("UPDATE {dst} AS t SET {sets} FROM {stage} AS s WHERE t.{id} = s.{id}").format(
                dst=self.dst, stage=stage, id=self.dst_id, sets=sets
            )
        copy_sql = sql.SQL("COPY {} ({}, {}) FROM STDIN (FORMAT BINARY)").format(stage, self.dst_id, cols)
        types = [id_type] + [t for t, _ in adapters]
        ids = results.column("id").to_pylist()
        columns = [_column_values(results.column(mapping[n])) for n in names]
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

        workers = min(self.dataset.write_concurrency, len(batches))
        connections = [self.conn] + [self._connect_like_main() for _ in range(workers - 1)]
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
                    written = write_batch(conn, start, stop)
                except psycopg.Error as exc:
                    failure.append((number, start, stop, exc))
                    return
                with lock:
                    stats.rows_written += written
                    stats.batches += 1

        try:
            if workers == 1:
                worker(self.conn)
            else:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    list(pool.map(worker, connections))
        finally:
            for conn in connections[1:]:
                conn.close()
        if failure:
            number, start, stop, exc = failure[0]
            where = f"batch {number} of {len(batches)} (row ids {ids[start]}..{ids[stop - 1]})"
            if isinstance(exc, psycopg.OperationalError):
                raise ConnectionLostError(
                    f"dataset '{self.name}': lost the database connection while writing {where}: {_clean(exc)}. "
                    f"That batch was rolled back; {stats.rows_written} rows of other batches are committed. "
                    "Re-run the partition: it picks up the rows still needing work."
                ) from None
            raise StoreError(
                f"dataset '{self.name}': the database rejected {where}: {_clean(exc)}. That batch was rolled "
                f"back; {stats.rows_written} rows of other batches are committed."
            ) from None
        return stats

    def _connect_like_main(self) -> psycopg.Connection:
        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=15)
        if self.has_pgvector:
            from pgvector.psycopg import register_vector

            register_vector(conn)
        return conn

    # -- failures --------------------------------------------------------------------------------
    def record_failures(self, failures: Sequence[Failure]) -> None:
        if not failures:
            return
        now = utc_now()
        with self.conn.transaction(), self.conn.cursor() as cursor:
            cursor.executemany(
                sql.SQL(
                    "INSERT INTO {t} AS f (dataset, row_id, stage, error_class, message, attempts, first_failed_at, "
                    "last_failed_at, requeued) VALUES (%s, %s, %s, %s, %s, 1, %s, %s, false) "
                    "ON CONFLICT (dataset, row_id, stage) DO UPDATE SET error_class = EXCLUDED.error_class, "
                    "message = EXCLUDED.message, attempts = f.attempts + 1, last_failed_at = EXCLUDED.last_failed_at, "
                    "requeued = false"
                ).format(t=self.failures_table),
                [(self.name, str(f.row_id), f.stage, f.error_class, f.message, now, now) for f in failures],
            )

    def clear_failures(self, row_ids: Sequence[object], stages: Sequence[str] | None = None) -> int:
        if not row_ids:
            return 0
        query = sql.SQL("DELETE FROM {} WHERE dataset = %s AND row_id = ANY(%s)").format(self.failures_table)
        params: list = [self.name, [str(i) for i in row_ids]]
        if stages:
            query += sql.SQL(" AND stage = ANY(%s)")
            params.append(list(stages))
        return self.conn.execute(query, params).rowcount

    def cooling_down_ids(self, row_ids: Sequence[object], hours: float) -> set[object]:
        if hours <= 0 or not row_ids:
            return set()
        since = utc_now() - timedelta(hours=hours)
        failed = {
            r[0]
            for r in self.conn.execute(
                sql.SQL("SELECT row_id FROM {} WHERE dataset = %s AND NOT requeued AND last_failed_at > %s").format(
                    self.failures_table
                ),
                [self.name, since],
            )
        }
        return {i for i in row_ids if str(i) in failed}

    def failures(self, limit: int = 100) -> list[dict]:
        cursor = self.conn.execute(
            sql.SQL(
                "SELECT row_id, stage, error_class, message, attempts, first_failed_at, last_failed_at, requeued "
                "FROM {} WHERE dataset = %s ORDER BY last_failed_at DESC LIMIT %s"
            ).format(self.failures_table),
            [self.name, limit],
        )
        names = [c.name for c in cursor.description]
        return [dict(zip(names, r, strict=True)) for r in cursor]

    def requeue_failures(self, row_ids: Sequence[object] | None = None) -> int:
        query = sql.SQL("UPDATE {} SET requeued = true WHERE dataset = %s AND NOT requeued").format(self.failures_table)
        params: list = [self.name]
        if row_ids is not None:
            query += sql.SQL(" AND row_id = ANY(%s)")
            params.append([str(i) for i in row_ids])
        return self.conn.execute(query, params).rowcount

    # -- cache and budgets -----------------------------------------------------------------------
    def cache_get(self, keys: Sequence[str], max_age_days: float) -> dict[str, bytes]:
        if not keys:
            return {}
        with self._side_lock:
            rows = self._side().execute(
                sql.SQL(
                    "SELECT key, value FROM {} WHERE key = ANY(%s) AND created_at > now() - make_interval(secs => %s)"
                ).format(self.cache_table),
                [list(keys), max_age_days * 86400],
            )
            return {k: bytes(v) for k, v in rows}

    def cache_put(self, items: dict[str, bytes]) -> None:
        if not items:
            return
        with self._side_lock, self._side().cursor() as cursor:
            cursor.executemany(
                sql.SQL(
                    "INSERT INTO {} (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE "
                    "SET value = EXCLUDED.value, created_at = now()"
                ).format(self.cache_table),
                list(items.items()),
            )

    def reserve_budget(self, key: str, request_seconds: float, token_seconds: float, burst_seconds: float) -> float:
        with self._side_lock:
            conn = self._side()
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (key, request_tat, token_tat) VALUES (%s, 0, 0) ON CONFLICT (key) DO NOTHING"
                ).format(self.budget_table),
                [key],
            )
            # one statement: the row lock serialises every process; the database clock is the only clock
            row = conn.execute(
                sql.SQL(
                    "WITH c AS (SELECT extract(epoch FROM clock_timestamp())::double precision AS now) "
                    "UPDATE {} AS b SET request_tat = greatest(b.request_tat, c.now) + %(req)s, "
                    "token_tat = greatest(b.token_tat, c.now) + %(tok)s FROM c WHERE b.key = %(key)s "
                    "RETURNING greatest(0, b.request_tat - c.now - %(burst)s, b.token_tat - c.now - %(burst)s)"
                ).format(self.budget_table),
                {"req": request_seconds, "tok": token_seconds, "key": key, "burst": burst_seconds},
            ).fetchone()
        return float(row[0])

    # -- partition leases ------------------------------------------------------------------------
    def _try_lease(self, key: str, run_id: str, replace: str | None) -> bool:
        row = self.conn.execute(
            sql.SQL(
                "INSERT INTO {t} AS l (dataset, partition_key, run_id, acquired_at) VALUES (%s, %s, %s, now()) "
                "ON CONFLICT (dataset, partition_key) DO UPDATE SET run_id = EXCLUDED.run_id, acquired_at = now() "
                "WHERE l.run_id IN (EXCLUDED.run_id, %s) RETURNING run_id"
            ).format(t=self.leases_table),
            [self.name, key, run_id, replace or run_id],
        ).fetchone()
        return row is not None

    def lease_holder(self, key: str) -> tuple[str, datetime] | None:
        row = self.conn.execute(
            sql.SQL("SELECT run_id, acquired_at FROM {} WHERE dataset = %s AND partition_key = %s").format(
                self.leases_table
            ),
            [self.name, key],
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def release_partition(self, key: str, run_id: str) -> None:
        self.conn.execute(
            sql.SQL("DELETE FROM {} WHERE dataset = %s AND partition_key = %s AND run_id = %s").format(
                self.leases_table
            ),
            [self.name, key, run_id],
        )


def _column_values(column: pa.ChunkedArray) -> list:
    """Python values of a results column; vectors as float32 numpy rows (``None`` for null)."""
    if pa.types.is_fixed_size_list(column.type):
        array = column.combine_chunks()
        valid = array.is_valid().to_numpy(zero_copy_only=False)
        matrix = array.flatten().to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
        rows = iter(matrix)
        return [next(rows) if ok else None for ok in valid]
    return [None if v is None else encode_skills(v) if not isinstance(v, str) else v for v in column.to_pylist()]


def _clean(exc: Exception) -> str:
    """A one-line driver message without the connection string (which may hold a password)."""
    text = " ".join(str(exc).split())
    return re.sub(r"postgres(?:ql)?://\S+", "postgresql://…", text)
