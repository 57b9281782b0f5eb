"""Connecting to Postgres and reading its catalog: column types, table existence, pgvector."""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg
from psycopg import sql

from .base import ConnectionLostError
from .layout import TableRef

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


def clean_error(exc: Exception) -> str:
    """A one-line driver message without the connection string (which may hold a password)."""
    text = " ".join(str(exc).split())
    return re.sub(r"postgres(?:ql)?://\S+", "postgresql://…", text)


@dataclass(frozen=True)
class Timeouts:
    """Time limits set on every connection, so a lock held elsewhere cannot hang a step for ever."""

    lock_seconds: float = 30.0
    statement_seconds: float = 900.0

    @property
    def options(self) -> str:
        return (
            f"-c lock_timeout={int(self.lock_seconds * 1000)} -c statement_timeout={int(self.statement_seconds * 1000)}"
        )


def connect(url: str, dataset: str, timeouts: Timeouts | None = None) -> psycopg.Connection:
    """An autocommit connection, with pgvector's types registered when the extension is there, named
    ``backfill_pipeline:<dataset>`` in ``pg_stat_activity`` (so a DBA can count and bound them)."""
    options = (timeouts or Timeouts()).options
    try:
        conn = psycopg.connect(
            url, autocommit=True, connect_timeout=15, options=options, application_name=f"backfill_pipeline:{dataset}"
        )
    except psycopg.OperationalError as exc:
        raise ConnectionLostError(f"dataset '{dataset}': cannot connect to the database: {clean_error(exc)}") from None
    if has_pgvector(conn):
        from pgvector.psycopg import register_vector

        register_vector(conn)
    return conn


def has_pgvector(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is not None


def identifier(table: TableRef) -> sql.Identifier:
    return sql.Identifier(table.schema, table.name) if table.schema else sql.Identifier(table.name)


class Catalog:
    """Column types per table, read once and kept until refreshed."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        self._types: dict[TableRef, dict[str, ColumnType]] = {}

    def columns(self, table: TableRef, refresh: bool = False) -> dict[str, ColumnType]:
        if refresh or table not in self._types:
            rows = self.conn.execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typname, t.typcategory "
                "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
                "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
                [identifier(table).as_string(self.conn)],
            ).fetchall()
            self._types[table] = {r[0]: ColumnType(r[1], r[2], r[3]) for r in rows}
        return self._types[table]

    def exists(self, table: TableRef) -> bool:
        row = self.conn.execute("SELECT to_regclass(%s)", [identifier(table).as_string(self.conn)]).fetchone()
        return row is not None and row[0] is not None

    def forget(self) -> None:
        self._types.clear()
