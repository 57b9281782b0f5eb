"""The pipeline's own tables in the SQLite file: failures, leases, the paid-results cache, rate budgets."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta

from .base import (
    BATCHES_TABLE,
    BUDGET_TABLE,
    BURST_SUFFIX,
    CACHE_TABLE,
    CLAIM,
    FAILURES_TABLE,
    LEASES_TABLE,
    OWN_TABLES,
    BatchRecord,
    Failure,
    Floors,
    Ledger,
    utc_now,
)
from .sqlite_rows import immediate, table_columns

_TABLES = {
    CACHE_TABLE: "key TEXT PRIMARY KEY, value BLOB NOT NULL, created_at REAL NOT NULL",
    BUDGET_TABLE: "key TEXT PRIMARY KEY, request_tat REAL NOT NULL, token_tat REAL NOT NULL",
    LEASES_TABLE: "dataset TEXT NOT NULL, partition_key TEXT NOT NULL, run_id TEXT NOT NULL, "
    "acquired_at TEXT NOT NULL, PRIMARY KEY (dataset, partition_key)",
    FAILURES_TABLE: "dataset TEXT NOT NULL, row_id TEXT NOT NULL, stage TEXT NOT NULL, error_class TEXT NOT NULL, "
    "message TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 1, first_failed_at TEXT NOT NULL, "
    "last_failed_at TEXT NOT NULL, requeued INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (dataset, row_id, stage)",
    BATCHES_TABLE: "dataset TEXT NOT NULL, label TEXT NOT NULL, partition_key TEXT NOT NULL, stage TEXT NOT NULL, "
    "batch_id TEXT, state TEXT NOT NULL, lines TEXT NOT NULL, note TEXT, created_at TEXT NOT NULL, "
    "updated_at TEXT NOT NULL, PRIMARY KEY (dataset, label)",
}


class SQLiteLedger(Ledger):
    def __init__(self, dataset: str, conn: sqlite3.Connection):
        super().__init__(dataset)
        self.conn = conn
        self._lock = threading.Lock()  # the engine calls cache and budget methods from worker threads

    def missing_tables(self) -> list[str]:
        return [f"{t} (table)" for t in OWN_TABLES if not table_columns(self.conn, t)]

    def create_tables(self) -> None:
        for table, columns in _TABLES.items():
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns})")

    # -- failures --------------------------------------------------------------------------------
    def record_failures(self, failures: Sequence[Failure]) -> None:
        if not failures:
            return
        now = utc_now().isoformat()
        with self._lock, immediate(self.conn):  # also from the engine's threads, beside the cache's writes
            self.conn.executemany(
                f"INSERT INTO {FAILURES_TABLE} (dataset, row_id, stage, error_class, message, attempts, "
                "first_failed_at, last_failed_at, requeued) VALUES (?, ?, ?, ?, ?, 1, ?, ?, 0) "
                "ON CONFLICT (dataset, row_id, stage) DO UPDATE SET error_class = excluded.error_class, "
                f"message = excluded.message, attempts = {FAILURES_TABLE}.attempts + 1, "
                "last_failed_at = excluded.last_failed_at, requeued = 0",
                [(self.dataset, str(f.row_id), f.stage, f.error_class, f.message, now, now) for f in failures],
            )

    def clear_failures(self, row_ids: Sequence[object], stages: Sequence[str] | None = None) -> int:
        if not row_ids:
            return 0
        stage_clause = f" AND stage IN ({', '.join('?' * len(stages))})" if stages else ""
        total = 0
        with immediate(self.conn):
            for start in range(0, len(row_ids), 500):
                chunk = [str(i) for i in row_ids[start : start + 500]]
                cur = self.conn.execute(
                    f"DELETE FROM {FAILURES_TABLE} WHERE dataset = ? AND row_id IN ({', '.join('?' * len(chunk))})"
                    + stage_clause,
                    [self.dataset, *chunk, *(stages or [])],
                )
                total += cur.rowcount
        return total

    def failed_since(self, hours: float) -> set[str]:
        since = (utc_now() - timedelta(hours=hours)).isoformat()
        rows = self.conn.execute(
            f"SELECT row_id FROM {FAILURES_TABLE} WHERE dataset = ? AND requeued = 0 AND last_failed_at > ?",
            [self.dataset, since],
        )
        return {r[0] for r in rows}

    def failures(self, limit: int = 100, offset: int = 0) -> list[dict]:
        cur = self.conn.execute(
            f"SELECT row_id, stage, error_class, message, attempts, first_failed_at, last_failed_at, requeued "
            f"FROM {FAILURES_TABLE} WHERE dataset = ? ORDER BY last_failed_at DESC, row_id, stage LIMIT ? OFFSET ?",
            [self.dataset, limit, offset],
        )
        names = [c[0] for c in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur]

    def failure_count(self) -> int:
        query = f"SELECT count(*) FROM {FAILURES_TABLE} WHERE dataset = ?"
        return int(self.conn.execute(query, [self.dataset]).fetchone()[0])

    def failure_classes(self) -> dict[str, dict[str, int]]:
        rows = self.conn.execute(
            f"SELECT stage, error_class, count(*) FROM {FAILURES_TABLE} WHERE dataset = ? GROUP BY 1, 2", [self.dataset]
        )
        out: dict[str, dict[str, int]] = {}
        for stage, cls, n in rows:
            out.setdefault(stage, {})[cls] = n
        return out

    def requeue_failures(self, row_ids: Sequence[object] | None = None) -> int:
        sql = f"UPDATE {FAILURES_TABLE} SET requeued = 1 WHERE dataset = ? AND requeued = 0"
        params: list = [self.dataset]
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
        with self._lock, immediate(self.conn):
            self.conn.executemany(
                f"INSERT INTO {CACHE_TABLE} (key, value, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, created_at = excluded.created_at",
                [(k, v, now) for k, v in items.items()],
            )

    def cache_claim(self, keys: Sequence[str], owner: str, seconds: float) -> set[str]:
        now = time.time()
        held: set[str] = set()
        with self._lock, immediate(self.conn):
            for key in keys:
                row = self.conn.execute(
                    f"INSERT INTO {CACHE_TABLE} (key, value, created_at) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE "
                    "SET value = excluded.value, created_at = excluded.created_at "
                    f"WHERE {CACHE_TABLE}.value = excluded.value OR {CACHE_TABLE}.created_at < ? RETURNING key",
                    [CLAIM + key, owner.encode(), now, now - seconds],
                ).fetchone()
                if row is not None:
                    held.add(key)
        return held

    def cache_release(self, keys: Sequence[str], owner: str) -> None:
        with self._lock, immediate(self.conn):
            self.conn.executemany(
                f"DELETE FROM {CACHE_TABLE} WHERE key = ? AND value = ?", [(CLAIM + k, owner.encode()) for k in keys]
            )

    def reserve_budget(
        self, key: str, request_seconds: float, token_seconds: float, burst_seconds: float, floors: Floors = (0, 0)
    ) -> float:
        with self._lock, immediate(self.conn):
            now = time.time()
            row = self.conn.execute(
                f"SELECT request_tat, token_tat FROM {BUDGET_TABLE} WHERE key = ?", [key]
            ).fetchone()
            request_tat, token_tat = row if row else (now, now)
            request_tat = max(request_tat, now + floors[0]) + request_seconds
            token_tat = max(token_tat, now + floors[1]) + token_seconds
            self.conn.execute(
                f"INSERT INTO {BUDGET_TABLE} (key, request_tat, token_tat) VALUES (?, ?, ?) ON CONFLICT (key) "
                "DO UPDATE SET request_tat = excluded.request_tat, token_tat = excluded.token_tat",
                [key, request_tat, token_tat],
            )
        return max(0.0, request_tat - now - burst_seconds, token_tat - now - burst_seconds)

    def budget_burst(self, key: str) -> float | None:
        with self._lock:
            row = self.conn.execute(
                f"SELECT request_tat FROM {BUDGET_TABLE} WHERE key = ?", [key + BURST_SUFFIX]
            ).fetchone()
        return float(row[0]) if row else None

    def set_budget_burst(self, key: str, seconds: float, lower: bool = False) -> float:
        with self._lock, immediate(self.conn):
            update = "excluded.request_tat" if lower else f"max({BUDGET_TABLE}.request_tat, excluded.request_tat)"
            self.conn.execute(
                f"INSERT INTO {BUDGET_TABLE} (key, request_tat, token_tat) VALUES (?, ?, 0) "
                f"ON CONFLICT (key) DO UPDATE SET request_tat = {update}",
                [key + BURST_SUFFIX, seconds],
            )
            row = self.conn.execute(
                f"SELECT request_tat FROM {BUDGET_TABLE} WHERE key = ?", [key + BURST_SUFFIX]
            ).fetchone()
        return float(row[0])

    # -- batches -----------------------------------------------------------------------------------
    def batch_intent(self, record: BatchRecord) -> None:
        now = utc_now().isoformat()
        with self._lock, immediate(self.conn):
            self.conn.execute(
                f"INSERT INTO {BATCHES_TABLE} (dataset, label, partition_key, stage, batch_id, state, lines, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [
                    self.dataset,
                    record.label,
                    record.partition_key,
                    record.stage,
                    record.batch_id,
                    record.state,
                    json.dumps(record.lines),
                    now,
                    now,
                ],
            )

    def _batch_update(self, label: str, **values: str) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._lock, immediate(self.conn):
            self.conn.execute(
                f"UPDATE {BATCHES_TABLE} SET {sets}, updated_at = ? WHERE dataset = ? AND label = ?",
                [*values.values(), utc_now().isoformat(), self.dataset, label],
            )

    def batch_submitted(self, label: str, batch_id: str) -> None:
        self._batch_update(label, batch_id=batch_id, state="submitted")

    def batch_done(self, label: str, note: str) -> None:
        self._batch_update(label, state="done", note=note)

    def open_batches(self, partition_key: str, stage: str) -> list[BatchRecord]:
        with self._lock:
            rows = self.conn.execute(
                f"SELECT label, partition_key, stage, batch_id, state, lines FROM {BATCHES_TABLE} WHERE dataset = ? "
                "AND partition_key = ? AND stage = ? AND state <> 'done' ORDER BY created_at, label",
                [self.dataset, partition_key, stage],
            ).fetchall()
        return [BatchRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    # -- partition leases ------------------------------------------------------------------------
    def _try_lease(self, key: str, run_id: str, replace: str | None) -> bool:
        row = self.conn.execute(
            f"INSERT INTO {LEASES_TABLE} (dataset, partition_key, run_id, acquired_at) VALUES (?, ?, ?, ?) "
            f"ON CONFLICT (dataset, partition_key) DO UPDATE SET run_id = excluded.run_id, "
            f"acquired_at = excluded.acquired_at WHERE {LEASES_TABLE}.run_id IN (excluded.run_id, ?) "
            "RETURNING run_id",
            [self.dataset, key, run_id, utc_now().isoformat(), replace or run_id],
        ).fetchone()
        return row is not None

    def lease_holder(self, key: str) -> tuple[str, float] | None:
        row = self.conn.execute(
            f"SELECT run_id, acquired_at FROM {LEASES_TABLE} WHERE dataset = ? AND partition_key = ?",
            [self.dataset, key],
        ).fetchone()
        return None if row is None else (row[0], (utc_now() - datetime.fromisoformat(row[1])).total_seconds())

    def renew_lease(self, key: str, run_id: str) -> bool:
        # acquired_at holds the last renewal: a lease is as fresh as its holder's last sign of life
        cursor = self.conn.execute(
            f"UPDATE {LEASES_TABLE} SET acquired_at = ? WHERE dataset = ? AND partition_key = ? AND run_id = ?",
            [utc_now().isoformat(), self.dataset, key, run_id],
        )
        return cursor.rowcount == 1

    def release_partition(self, key: str, run_id: str) -> None:
        self.conn.execute(
            f"DELETE FROM {LEASES_TABLE} WHERE dataset = ? AND partition_key = ? AND run_id = ?",
            [self.dataset, key, run_id],
        )

    def live_leases_before(self, key: str, seconds: float) -> int:
        since = (utc_now() - timedelta(seconds=seconds)).isoformat()
        row = self.conn.execute(
            f"SELECT count(*) FROM {LEASES_TABLE} WHERE dataset = ? AND partition_key < ? AND acquired_at > ?",
            [self.dataset, key, since],
        ).fetchone()
        return int(row[0])
