"""The pipeline's own tables in Postgres: failures, partition leases, the paid-results cache, rate budgets.

They live in the target table's schema. Cache and budget calls come from the engine's worker threads and
go through a side connection of their own, so they never interleave with a read or a write.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TypeVar

import psycopg
from psycopg import sql

from .base import (
    BATCHES_TABLE,
    BUDGET_TABLE,
    BURST_SUFFIX,
    CACHE_TABLE,
    CLAIM,
    FAILURES_TABLE,
    LEASES_TABLE,
    BatchRecord,
    Failure,
    Floors,
    Ledger,
    utc_now,
)
from .layout import TableRef
from .postgres_catalog import Catalog, Timeouts, connect, identifier

T = TypeVar("T")

_TABLES: dict[str, sql.SQL] = {
    FAILURES_TABLE: sql.SQL(
        "dataset text NOT NULL, row_id text NOT NULL, stage text NOT NULL, error_class text NOT NULL, "
        "message text NOT NULL, attempts integer NOT NULL DEFAULT 1, first_failed_at timestamptz NOT NULL, "
        "last_failed_at timestamptz NOT NULL, requeued boolean NOT NULL DEFAULT false, "
        "PRIMARY KEY (dataset, row_id, stage)"
    ),
    CACHE_TABLE: sql.SQL("key text PRIMARY KEY, value bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now()"),
    BUDGET_TABLE: sql.SQL(
        "key text PRIMARY KEY, request_tat double precision NOT NULL, token_tat double precision NOT NULL"
    ),
    LEASES_TABLE: sql.SQL(
        "dataset text NOT NULL, partition_key text NOT NULL, run_id text NOT NULL, acquired_at timestamptz NOT NULL, "
        "PRIMARY KEY (dataset, partition_key)"
    ),
    BATCHES_TABLE: sql.SQL(
        "dataset text NOT NULL, label text NOT NULL, partition_key text NOT NULL, stage text NOT NULL, batch_id text, "
        "state text NOT NULL, lines jsonb NOT NULL, note text, created_at timestamptz NOT NULL DEFAULT now(), "
        "updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (dataset, label)"
    ),
}


class PostgresLedger(Ledger):
    def __init__(self, dataset: str, conn: psycopg.Connection, url: str, schema: str | None, timeouts: Timeouts):
        super().__init__(dataset)
        self.conn = conn
        self.url = url
        self.timeouts = timeouts
        self.refs = {name: TableRef(name, schema) for name in _TABLES}
        self.failures_table = identifier(self.refs[FAILURES_TABLE])
        self.leases_table = identifier(self.refs[LEASES_TABLE])
        self.cache_table = identifier(self.refs[CACHE_TABLE])
        self.budget_table = identifier(self.refs[BUDGET_TABLE])
        self.batches_table = identifier(self.refs[BATCHES_TABLE])
        self._side_conn: psycopg.Connection | None = None
        self._side_lock = threading.Lock()

    def close(self) -> None:
        if self._side_conn is not None:
            self._side_conn.close()

    def _side(self) -> psycopg.Connection:
        if self._side_conn is None or self._side_conn.closed:
            self._side_conn = connect(self.url, self.dataset, self.timeouts)
        return self._side_conn

    def _on_side(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run ``work`` on the side connection, once more on a new one when the server dropped it (a
        restart): a paid answer or a paid failure kept after the database is back is not lost to a
        connection that died while it was away. Every such operation is safe to repeat."""
        with self._side_lock:
            try:
                return work(self._side())
            except psycopg.OperationalError:
                if self._side_conn is None or not (self._side_conn.broken or self._side_conn.closed):
                    raise  # a timeout, a lock: the connection is fine and a repeat would not help
                self._side_conn.close()
                return work(self._side())

    def missing_tables(self) -> list[str]:
        catalog = Catalog(self.conn)
        return [f"{name} (table)" for name, ref in self.refs.items() if not catalog.exists(ref)]

    def create_tables(self) -> None:
        for name, columns in _TABLES.items():
            self.conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(identifier(self.refs[name]), columns)
            )

    # -- failures --------------------------------------------------------------------------------
    def record_failures(self, failures: Sequence[Failure]) -> None:
        if not failures:
            return
        now = utc_now()
        query = sql.SQL(
            "INSERT INTO {t} AS f (dataset, row_id, stage, error_class, message, attempts, first_failed_at, "
            "last_failed_at, requeued) VALUES (%s, %s, %s, %s, %s, 1, %s, %s, false) "
            "ON CONFLICT (dataset, row_id, stage) DO UPDATE SET error_class = EXCLUDED.error_class, "
            "message = EXCLUDED.message, attempts = f.attempts + 1, last_failed_at = EXCLUDED.last_failed_at, "
            "requeued = false"
        ).format(t=self.failures_table)
        rows = [(self.dataset, str(f.row_id), f.stage, f.error_class, f.message, now, now) for f in failures]

        def record(conn: psycopg.Connection) -> None:
            with conn.transaction(), conn.cursor() as cursor:
                cursor.executemany(query, rows)

        self._on_side(record)

    def clear_failures(self, row_ids: Sequence[object], stages: Sequence[str] | None = None) -> int:
        if not row_ids:
            return 0
        query = sql.SQL("DELETE FROM {} WHERE dataset = %s AND row_id = ANY(%s)").format(self.failures_table)
        params: list = [self.dataset, [str(i) for i in row_ids]]
        if stages:
            query += sql.SQL(" AND stage = ANY(%s)")
            params.append(list(stages))
        return self.conn.execute(query, params).rowcount

    def failed_since(self, hours: float) -> set[str]:
        rows = self.conn.execute(
            sql.SQL("SELECT row_id FROM {} WHERE dataset = %s AND NOT requeued AND last_failed_at > %s").format(
                self.failures_table
            ),
            [self.dataset, utc_now() - timedelta(hours=hours)],
        )
        return {r[0] for r in rows}

    def failures(self, limit: int = 100, offset: int = 0) -> list[dict]:
        cursor = self.conn.execute(
            sql.SQL(
                "SELECT row_id, stage, error_class, message, attempts, first_failed_at, last_failed_at, requeued "
                "FROM {} WHERE dataset = %s ORDER BY last_failed_at DESC, row_id, stage LIMIT %s OFFSET %s"
            ).format(self.failures_table),
            [self.dataset, limit, offset],
        )
        names = [c.name for c in cursor.description or []]
        return [dict(zip(names, r, strict=True)) for r in cursor]

    def failure_count(self) -> int:
        query = sql.SQL("SELECT count(*) FROM {} WHERE dataset = %s").format(self.failures_table)
        row = self.conn.execute(query, [self.dataset]).fetchone()
        return int(row[0]) if row else 0

    def failure_classes(self) -> dict[str, dict[str, int]]:
        query = sql.SQL("SELECT stage, error_class, count(*) FROM {} WHERE dataset = %s GROUP BY 1, 2")
        out: dict[str, dict[str, int]] = {}
        for stage, cls, n in self.conn.execute(query.format(self.failures_table), [self.dataset]):
            out.setdefault(stage, {})[cls] = n
        return out

    def requeue_failures(self, row_ids: Sequence[object] | None = None) -> int:
        query = sql.SQL("UPDATE {} SET requeued = true WHERE dataset = %s AND NOT requeued").format(self.failures_table)
        params: list = [self.dataset]
        if row_ids is not None:
            query += sql.SQL(" AND row_id = ANY(%s)")
            params.append([str(i) for i in row_ids])
        return self.conn.execute(query, params).rowcount

    # -- cache and budgets -----------------------------------------------------------------------
    def cache_get(self, keys: Sequence[str], max_age_days: float) -> dict[str, bytes]:
        if not keys:
            return {}
        query = sql.SQL(
            "SELECT key, value FROM {} WHERE key = ANY(%s) AND created_at > now() - make_interval(secs => %s)"
        ).format(self.cache_table)
        rows = self._on_side(lambda conn: conn.execute(query, [list(keys), max_age_days * 86400]).fetchall())
        return {k: bytes(v) for k, v in rows}

    def cache_put(self, items: dict[str, bytes]) -> None:
        if not items:
            return
        query = sql.SQL(
            "INSERT INTO {} (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE "
            "SET value = EXCLUDED.value, created_at = now()"
        ).format(self.cache_table)

        def put(conn: psycopg.Connection) -> None:
            with conn.cursor() as cursor:
                cursor.executemany(query, list(items.items()))

        self._on_side(put)

    def cache_claim(self, keys: Sequence[str], owner: str, seconds: float) -> set[str]:
        if not keys:
            return set()
        query = sql.SQL(
            "INSERT INTO {t} AS c (key, value, created_at) SELECT %s || k, %s, now() FROM unnest(%s::text[]) k "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, created_at = now() "
            "WHERE c.value = EXCLUDED.value OR c.created_at < now() - make_interval(secs => %s) RETURNING key"
        ).format(t=self.cache_table)
        rows = self._on_side(
            lambda conn: conn.execute(query, [CLAIM, owner.encode(), sorted(keys), seconds]).fetchall()
        )
        return {k[len(CLAIM) :] for (k,) in rows}

    def cache_release(self, keys: Sequence[str], owner: str) -> None:
        if not keys:
            return
        query = sql.SQL("DELETE FROM {} WHERE key = ANY(%s) AND value = %s").format(self.cache_table)
        self._on_side(lambda conn: conn.execute(query, [[CLAIM + k for k in keys], owner.encode()]))

    def reserve_budget(
        self, key: str, request_seconds: float, token_seconds: float, burst_seconds: float, floors: Floors = (0, 0)
    ) -> float:
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
                    "UPDATE {} AS b SET request_tat = greatest(b.request_tat, c.now + %(rfloor)s) + %(req)s, "
                    "token_tat = greatest(b.token_tat, c.now + %(tfloor)s) + %(tok)s FROM c WHERE b.key = %(key)s "
                    "RETURNING greatest(0, b.request_tat - c.now - %(burst)s, b.token_tat - c.now - %(burst)s)"
                ).format(self.budget_table),
                {
                    "req": request_seconds,
                    "tok": token_seconds,
                    "key": key,
                    "burst": burst_seconds,
                    "rfloor": floors[0],
                    "tfloor": floors[1],
                },
            ).fetchone()
        return float(row[0]) if row else 0.0

    def budget_burst(self, key: str) -> float | None:
        with self._side_lock:
            row = (
                self._side()
                .execute(
                    sql.SQL("SELECT request_tat FROM {} WHERE key = %s").format(self.budget_table), [key + BURST_SUFFIX]
                )
                .fetchone()
            )
        return float(row[0]) if row else None

    def set_budget_burst(self, key: str, seconds: float, lower: bool = False) -> float:
        with self._side_lock:
            row = (
                self._side()
                .execute(
                    sql.SQL(
                        "INSERT INTO {} AS b (key, request_tat, token_tat) VALUES (%(key)s, %(s)s, 0) "
                        "ON CONFLICT (key) DO UPDATE SET request_tat = CASE WHEN %(lower)s THEN EXCLUDED.request_tat "
                        "ELSE greatest(b.request_tat, EXCLUDED.request_tat) END RETURNING request_tat"
                    ).format(self.budget_table),
                    {"key": key + BURST_SUFFIX, "s": seconds, "lower": lower},
                )
                .fetchone()
            )
        return float(row[0]) if row else seconds

    # -- batches -----------------------------------------------------------------------------------
    def batch_intent(self, record: BatchRecord) -> None:
        self.conn.execute(
            sql.SQL(
                "INSERT INTO {} (dataset, label, partition_key, stage, batch_id, state, lines) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb) ON CONFLICT DO NOTHING"
            ).format(self.batches_table),
            [
                self.dataset,
                record.label,
                record.partition_key,
                record.stage,
                record.batch_id,
                record.state,
                json.dumps(record.lines),
            ],
        )

    def _batch_update(self, label: str, **values: str) -> None:
        sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in values)
        self.conn.execute(
            sql.SQL("UPDATE {} SET {}, updated_at = now() WHERE dataset = %s AND label = %s").format(
                self.batches_table, sets
            ),
            [*values.values(), self.dataset, label],
        )

    def batch_submitted(self, label: str, batch_id: str) -> None:
        self._batch_update(label, batch_id=batch_id, state="submitted")

    def batch_done(self, label: str, note: str) -> None:
        self._batch_update(label, state="done", note=note)

    def open_batches(self, partition_key: str, stage: str) -> list[BatchRecord]:
        rows = self.conn.execute(
            sql.SQL(
                "SELECT label, partition_key, stage, batch_id, state, lines FROM {} WHERE dataset = %s "
                "AND partition_key = %s AND stage = %s AND state <> 'done' ORDER BY created_at, label"
            ).format(self.batches_table),
            [self.dataset, partition_key, stage],
        ).fetchall()
        return [BatchRecord(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    # -- partition leases ------------------------------------------------------------------------
    def _try_lease(self, key: str, run_id: str, replace: str | None) -> bool:
        row = self.conn.execute(
            sql.SQL(
                "INSERT INTO {t} AS l (dataset, partition_key, run_id, acquired_at) VALUES (%s, %s, %s, now()) "
                "ON CONFLICT (dataset, partition_key) DO UPDATE SET run_id = EXCLUDED.run_id, acquired_at = now() "
                "WHERE l.run_id IN (EXCLUDED.run_id, %s) RETURNING run_id"
            ).format(t=self.leases_table),
            [self.dataset, key, run_id, replace or run_id],
        ).fetchone()
        return row is not None

    def lease_holder(self, key: str) -> tuple[str, float] | None:
        # the age comes from the database's clock, the one every process shares
        row = self.conn.execute(
            sql.SQL(
                "SELECT run_id, extract(epoch FROM now() - acquired_at)::double precision FROM {} "
                "WHERE dataset = %s AND partition_key = %s"
            ).format(self.leases_table),
            [self.dataset, key],
        ).fetchone()
        return None if row is None else (row[0], float(row[1]))

    def renew_lease(self, key: str, run_id: str) -> bool:
        # acquired_at holds the last renewal: a lease is as fresh as its holder's last sign of life
        cursor = self.conn.execute(
            sql.SQL(
                "UPDATE {} SET acquired_at = now() WHERE dataset = %s AND partition_key = %s AND run_id = %s"
            ).format(self.leases_table),
            [self.dataset, key, run_id],
        )
        return cursor.rowcount == 1

    def release_partition(self, key: str, run_id: str) -> None:
        self.conn.execute(
            sql.SQL("DELETE FROM {} WHERE dataset = %s AND partition_key = %s AND run_id = %s").format(
                self.leases_table
            ),
            [self.dataset, key, run_id],
        )

    def live_leases_before(self, key: str, seconds: float) -> int:
        row = self.conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {} WHERE dataset = %s AND partition_key < %s "
                "AND acquired_at > now() - make_interval(secs => %s)"
            ).format(self.leases_table),
            [self.dataset, key, seconds],
        ).fetchone()
        return int(row[0]) if row else 0
