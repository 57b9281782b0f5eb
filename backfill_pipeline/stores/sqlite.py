"""The embedded default store: a local SQLite file (standard library only).

Embeddings are stored as JSON arrays in TEXT columns (like a ``jsonb`` column), or as little-endian
float32 BLOBs when the column is declared ``BLOB``: the declared type decides, as the catalog does in
Postgres.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from ..config import DatasetConfig
from ..rows import vector_array
from .base import (
    BUDGET_TABLE,
    CACHE_TABLE,
    FAILURES_TABLE,
    LEASES_TABLE,
    OWN_TABLES,
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


def decode_vector(value: object) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, bytes | memoryview):
        return np.frombuffer(value, dtype="<f4")
    text = str(value).strip()
    if not text.startswith("[") or not text.endswith("]"):
        raise ValueError(f"embedding is neither a JSON array nor a float32 blob: {text[:40]!r}")
    return np.fromstring(text[1:-1], sep=",", dtype=np.float32)


class SQLiteStore(Store):
    def __init__(self, name: str, dataset: DatasetConfig, url: str):
        super().__init__(name, dataset)
        if dataset.schema_name or dataset.target.schema_name:
            raise StoreError(f"dataset '{name}': 'schema' is not supported for SQLite databases")
        self.path = sqlite_path(url)
        if not self.path.exists():
            raise StoreError(f"dataset '{name}': SQLite database {self.path} does not exist")
        self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA busy_timeout=60000")
        self._lock = threading.Lock()  # the engine calls cache and budget methods from worker threads
        d = dataset
        self.src = quote(d.table)
        self.separate = d.target.mode == "table"
        self.dst_table = d.target.table if self.separate else d.table
        self.dst = quote(self.dst_table)  # type: ignore[arg-type]
        self.dst_id = quote(d.target.id_column if self.separate else d.id_column)
        self.id = quote(d.id_column)

    def close(self) -> None:
        self.conn.close()

    # -- schema ----------------------------------------------------------------------------------
    def _columns(self, table: str) -> dict[str, str]:
        rows = self.conn.execute(f"PRAGMA table_info({quote(table)})").fetchall()
        return {r[1]: (r[2] or "").upper() for r in rows}

    def _source_filtered(self) -> str:
        where = f" WHERE ({self.dataset.row_filter})" if self.dataset.row_filter else ""
        return f"(SELECT * FROM {self.src}{where}) AS s"

    def missing_columns(self) -> list[str]:
        d = self.dataset
        source_cols = self._columns(d.table)
        if not source_cols:
            raise SchemaError(f"dataset '{self.name}': table {d.table} does not exist in {self.path}")
        needed = [d.id_column, *d.text.fields] + ([d.archive_column] if d.archive_column else [])
        absent = [c for c in needed if c not in source_cols]
        if absent:
            raise SchemaError(f"dataset '{self.name}': table {d.table} has no column(s) {', '.join(absent)}")
        missing: list[str] = []
        target_cols = self._columns(self.dst_table)
        if not target_cols:
            missing.append(f"{self.dst_table} (table)")
        else:
            missing += [f"{self.dst_table}.{c}" for c in d.result_columns if c not in target_cols]
        missing += [f"{t} (table)" for t in OWN_TABLES if not self._columns(t)]
        return missing

    def migrate(self) -> list[str]:
        d = self.dataset
        added = self.missing_columns()
        types = {d.embedding.column: "TEXT"}
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            if not self._columns(self.dst_table):
                cols = ", ".join(f"{quote(c)} {types.get(c, 'TEXT')}" for c in d.result_columns)
                self.conn.execute(f"CREATE TABLE {self.dst} ({self.dst_id} INTEGER PRIMARY KEY, {cols})")
            existing = self._columns(self.dst_table)
            for column in d.result_columns:
                if column not in existing:
                    self.conn.execute(f"ALTER TABLE {self.dst} ADD COLUMN {quote(column)} TEXT")
            self.conn.execute(
                f"CREATE TABLE IF NOT EXISTS {CACHE_TABLE} (key TEXT PRIMARY KEY, value BLOB NOT NULL, "
                "created_at REAL NOT NULL)"
            )
            self.conn.execute(
                f"CREATE TABLE IF NOT EXISTS {BUDGET_TABLE} (key TEXT PRIMARY KEY, request_tat REAL NOT NULL, "
                "token_tat REAL NOT NULL)"
            )
            self.conn.execute(
                f"CREATE TABLE IF NOT EXISTS {LEASES_TABLE} (dataset TEXT NOT NULL, partition_key TEXT NOT NULL, "
                "run_id TEXT NOT NULL, acquired_at TEXT NOT NULL, PRIMARY KEY (dataset, partition_key))"
            )
            self.conn.execute(
                f"CREATE TABLE IF NOT EXISTS {FAILURES_TABLE} (dataset TEXT NOT NULL, row_id TEXT NOT NULL, "
                "stage TEXT NOT NULL, error_class TEXT NOT NULL, message TEXT NOT NULL, "
                "attempts INTEGER NOT NULL DEFAULT 1, first_failed_at TEXT NOT NULL, "
                "last_failed_at TEXT NOT NULL, requeued INTEGER NOT NULL DEFAULT 0, "
                "PRIMARY KEY (dataset, row_id, stage))"
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return added

    # -- partitions ------------------------------------------------------------------------------
    def id_buckets(self, width: int, after_id: int | None = None) -> list[tuple[int, int]]:
        where, params = ("WHERE s.{id} > ?", [after_id]) if after_id is not None else ("", [])
        sql = (
            f"SELECT s.{self.id} / ? AS bucket, MAX(s.{self.id}) FROM {self._source_filtered()} "
            f"{where.format(id=self.id)} GROUP BY bucket ORDER BY bucket"
        )
        return [(int(b), int(m)) for b, m in self.conn.execute(sql, [width, *params])]

    def archive_groups(self, after_id: int | None = None) -> list[tuple[str, int]]:
        archive = quote(self.dataset.archive_column or "")
        where = f" AND s.{self.id} > ?" if after_id is not None else ""
        sql = (
            f"SELECT s.{archive}, MAX(s.{self.id}) FROM {self._source_filtered()} "
            f"WHERE s.{archive} IS NOT NULL{where} GROUP BY s.{archive} ORDER BY MIN(s.{self.id})"
        )
        params = [after_id] if after_id is not None else []
        return [(str(a), int(m)) for a, m in self.conn.execute(sql, params)]

    # -- rows ------------------------------------------------------------------------------------
    def _where(self, part: PartitionSpec | None) -> tuple[str, list]:
        clauses, params = [], []
        if part is not None and part.id_range is not None:
            clauses.append(f"s.{self.id} BETWEEN ? AND ?")
            params += list(part.id_range)
        if part is not None and part.archive is not None:
            clauses.append(f"s.{quote(self.dataset.archive_column or '')} = ?")
            params.append(part.archive)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def read_batches(self, part: PartitionSpec, batch_size: int) -> Iterator[pa.RecordBatch]:
        d = self.dataset
        r = "s" if not self.separate else "r"
        select = [f"s.{self.id}", f"s.{quote(d.archive_column)}" if d.archive_column else "NULL"]
        select += [f"s.{quote(f)}" for f in d.text.fields]
        select += [f"{r}.{quote(c)}" for c in (d.embedding.column, d.bookkeeping.content_hash, d.bookkeeping.model)]
        select += [f"{r}.{quote(c)}" for c in d.enrichment_columns.values()]
        join = f" LEFT JOIN {self.dst} AS r ON r.{self.dst_id} = s.{self.id}" if self.separate else ""
        where, params = self._where(part)
        sql = f"SELECT {', '.join(select)} FROM {self._source_filtered()}{join}{where} ORDER BY s.{self.id}"
        schema = self.raw_schema()
        n_text = len(d.text.fields)
        cursor = self.conn.execute(sql, params)
        while rows := cursor.fetchmany(batch_size):
            columns = list(zip(*rows, strict=True))
            emb_at = 2 + n_text
            arrays = [pa.array(columns[0], pa.int64()), pa.array(columns[1], pa.string())]
            arrays += [pa.array([None if v is None else str(v) for v in c], pa.string()) for c in columns[2:emb_at]]
            vectors = []
            for row_id, value in zip(columns[0], columns[emb_at], strict=True):
                try:
                    vectors.append(decode_vector(value))
                except ValueError as exc:
                    raise StoreError(
                        f"dataset '{self.name}', row id {row_id}, column {d.embedding.column}: {exc}"
                    ) from None
            arrays.append(vector_array(vectors))
            arrays += [pa.array(c, pa.string()) for c in columns[emb_at + 1 : emb_at + 3]]
            arrays += [pa.array([encode_skills(v) for v in c], pa.string()) for c in columns[emb_at + 3 :]]
            yield pa.RecordBatch.from_arrays(arrays, schema=schema)

    def _embedding_is_blob(self) -> bool:
        return "BLOB" in self._columns(self.dst_table).get(self.dataset.embedding.column, "")

    def write_results(self, results: pa.Table, batch_size: int) -> WriteStats:
        d = self.dataset
        mapping = result_column_mapping(d, results)
        if not mapping:
            return WriteStats()
        as_blob = self._embedding_is_blob()
        columns = {name: results.column(src) for name, src in mapping.items()}
        ids = results.column("id").to_pylist()
        names = list(columns)
        if self.separate:
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
                if name == d.embedding.column:
                    values.append(_encode_vectors(chunk, as_blob))
                else:
                    values.append([None if v is None else str(v) for v in chunk.to_pylist()])
            rows = list(zip(*values, strict=True))
            params = (
                [(i, *r) for i, r in zip(ids[start:stop], rows, strict=True)]
                if self.separate
                else [(*r, i) for i, r in zip(ids[start:stop], rows, strict=True)]
            )
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                cursor = self.conn.executemany(sql, params)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            stats.rows_written += cursor.rowcount
            stats.batches += 1
        return stats

    # -- failures --------------------------------------------------------------------------------
    def record_failures(self, failures: Sequence[Failure]) -> None:
        if not failures:
            return
        now = utc_now().isoformat()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(
                f"INSERT INTO {FAILURES_TABLE} (dataset, row_id, stage, error_class, message, attempts, "
                "first_failed_at, last_failed_at, requeued) VALUES (?, ?, ?, ?, ?, 1, ?, ?, 0) "
                "ON CONFLICT (dataset, row_id, stage) DO UPDATE SET error_class = excluded.error_class, "
                f"message = excluded.message, attempts = {FAILURES_TABLE}.attempts + 1, "
                "last_failed_at = excluded.last_failed_at, requeued = 0",
                [(self.name, str(f.row_id), f.stage, f.error_class, f.message, now, now) for f in failures],
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def clear_failures(self, row_ids: Sequence[object], stages: Sequence[str] | None = None) -> int:
        if not row_ids:
            return 0
        stage_clause = f" AND stage IN ({', '.join('?' * len(stages))})" if stages else ""
        total = 0
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for start in range(0, len(row_ids), 500):
                chunk = [str(i) for i in row_ids[start : start + 500]]
                cur = self.conn.execute(
                    f"DELETE FROM {FAILURES_TABLE} WHERE dataset = ? AND row_id IN ({', '.join('?' * len(chunk))})"
                    + stage_clause,
                    [self.name, *chunk, *(stages or [])],
                )
                total += cur.rowcount
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return total

    def cooling_down_ids(self, row_ids: Sequence[object], hours: float) -> set[object]:
        if hours <= 0:
            return set()
        since = (utc_now() - timedelta(hours=hours)).isoformat()
        failed = {
            r[0]
            for r in self.conn.execute(
                f"SELECT row_id FROM {FAILURES_TABLE} WHERE dataset = ? AND requeued = 0 AND last_failed_at > ?",
                [self.name, since],
            )
        }
        return {i for i in row_ids if str(i) in failed}

    def failures(self, limit: int = 100) -> list[dict]:
        cur = self.conn.execute(
            f"SELECT row_id, stage, error_class, message, attempts, first_failed_at, last_failed_at, requeued "
            f"FROM {FAILURES_TABLE} WHERE dataset = ? ORDER BY last_failed_at DESC LIMIT ?",
            [self.name, limit],
        )
        names = [c[0] for c in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur]

    def requeue_failures(self, row_ids: Sequence[object] | None = None) -> int:
        sql = f"UPDATE {FAILURES_TABLE} SET requeued = 1 WHERE dataset = ? AND requeued = 0"
        params: list = [self.name]
        if row_ids is not None:
            sql += f" AND row_id IN ({', '.join('?' * len(row_ids))})"
            params += [str(i) for i in row_ids]
        return self.conn.execute(sql, params).rowcount

    # -- cache and budgets -----------------------------------------------------------------------
    def cache_get(self, keys: Sequence[str], max_age_days: float) -> dict[str, bytes]:
        since = time.time() - max_age_days * 86400
        found: dict[str, bytes] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                rows = self.conn.execute(
                    f"SELECT key, value FROM {CACHE_TABLE} WHERE created_at > ? AND key IN "
                    f"({', '.join('?' * len(chunk))})",
                    [since, *chunk],
                )
                found.update({k: bytes(v) for k, v in rows})
        return found

    def cache_put(self, items: dict[str, bytes]) -> None:
        if not items:
            return
        now = time.time()
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.executemany(
                    f"INSERT INTO {CACHE_TABLE} (key, value, created_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, created_at = excluded.created_at",
                    [(k, v, now) for k, v in items.items()],
                )
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def reserve_budget(self, key: str, request_seconds: float, token_seconds: float, burst_seconds: float) -> float:
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")  # serialises every process sharing this file
            try:
                now = time.time()
                row = self.conn.execute(
                    f"SELECT request_tat, token_tat FROM {BUDGET_TABLE} WHERE key = ?", [key]
                ).fetchone()
                request_tat, token_tat = row if row else (now, now)
                request_tat = max(request_tat, now) + request_seconds
                token_tat = max(token_tat, now) + token_seconds
                self.conn.execute(
                    f"INSERT INTO {BUDGET_TABLE} (key, request_tat, token_tat) VALUES (?, ?, ?) ON CONFLICT (key) "
                    "DO UPDATE SET request_tat = excluded.request_tat, token_tat = excluded.token_tat",
                    [key, request_tat, token_tat],
                )
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        return max(0.0, request_tat - now - burst_seconds, token_tat - now - burst_seconds)

    # -- partition leases ------------------------------------------------------------------------
    def _try_lease(self, key: str, run_id: str, replace: str | None) -> bool:
        row = self.conn.execute(
            f"INSERT INTO {LEASES_TABLE} (dataset, partition_key, run_id, acquired_at) VALUES (?, ?, ?, ?) "
            f"ON CONFLICT (dataset, partition_key) DO UPDATE SET run_id = excluded.run_id, "
            f"acquired_at = excluded.acquired_at WHERE {LEASES_TABLE}.run_id IN (excluded.run_id, ?) "
            "RETURNING run_id",
            [self.name, key, run_id, utc_now().isoformat(), replace or run_id],
        ).fetchone()
        return row is not None

    def lease_holder(self, key: str) -> tuple[str, datetime] | None:
        row = self.conn.execute(
            f"SELECT run_id, acquired_at FROM {LEASES_TABLE} WHERE dataset = ? AND partition_key = ?",
            [self.name, key],
        ).fetchone()
        return None if row is None else (row[0], datetime.fromisoformat(row[1]))

    def release_partition(self, key: str, run_id: str) -> None:
        self.conn.execute(
            f"DELETE FROM {LEASES_TABLE} WHERE dataset = ? AND partition_key = ? AND run_id = ?",
            [self.name, key, run_id],
        )


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
