"""Opening the right store for a dataset's database URL."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..config import DatasetConfig
from .base import (
    BatchRecord,
    ConnectionLostError,
    Failure,
    Ledger,
    MissingColumnsError,
    PartitionSpec,
    RowStore,
    SchemaError,
    Store,
    StoreError,
    WriteStats,
)
from .groups import hash_bucket
from .layout import TableLayout

if TYPE_CHECKING:
    from .postgres_catalog import Timeouts

POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")


def open_store(name: str, dataset: DatasetConfig, url: str | None = None) -> Store:
    """Open the dataset's store; ``url`` (from a resource) overrides the config's URL."""
    url = url or dataset.database_url_value()
    layout = TableLayout.from_config(name, dataset)
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return _open_sqlite(layout, url, dataset.lock_timeout_seconds)
    if scheme in POSTGRES_SCHEMES:
        from .postgres_catalog import Timeouts

        timeouts = Timeouts(dataset.lock_timeout_seconds, dataset.statement_timeout_seconds)
        return _open_postgres(layout, url, dataset.write_concurrency, timeouts)
    what = "an empty value" if not url else f"scheme {scheme!r}" if scheme else "a value with no scheme"
    raise StoreError(
        f"dataset '{name}': the database URL is {what}; expected sqlite:///path or postgresql://…"
        + (f" (is {dataset.database_url.env} set?)" if not isinstance(dataset.database_url, str) else "")
    )


def hash_bucket_of(key_text: str | None, buckets: int) -> int | None:
    """SQLite's ``backfill_hash_bucket``: the same bucket as Postgres's expression and Python's."""
    return None if key_text is None else hash_bucket(str(key_text), buckets)


def _open_sqlite(layout: TableLayout, url: str, lock_timeout: float) -> Store:
    from .sqlite_ledger import SQLiteLedger
    from .sqlite_rows import SQLiteRows, decode_text, immediate, sqlite_path

    path = sqlite_path(url)
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to the current folder: {path.resolve()})"
        hint = (
            "; for the demo, run `backfill-pipeline demo` (or `create-demo-db`) in this folder first"
            if "demo" in path.name
            else ""
        )
        raise StoreError(f"dataset '{layout.dataset}': SQLite database {path} does not exist{where}{hint}")
    conn = sqlite3.connect(path, timeout=lock_timeout, isolation_level=None, check_same_thread=False)
    conn.text_factory = decode_text
    conn.create_function("backfill_hash_bucket", 2, hash_bucket_of, deterministic=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA busy_timeout={int(lock_timeout * 1000)}")
    try:
        rows = SQLiteRows(layout, conn, path)
    except StoreError:
        conn.close()
        raise
    return Store(rows, SQLiteLedger(layout.dataset, conn), conn.close, lambda: immediate(conn))


def _open_postgres(layout: TableLayout, url: str, write_concurrency: int, timeouts: Timeouts) -> Store:
    from .postgres_catalog import connect, has_pgvector
    from .postgres_ledger import PostgresLedger
    from .postgres_rows import PostgresRows

    url = url.replace("postgresql+psycopg://", "postgresql://", 1)
    conn = connect(url, layout.dataset, timeouts)
    rows = PostgresRows(layout, conn, url, has_pgvector(conn), write_concurrency, timeouts)
    ledger = PostgresLedger(layout.dataset, conn, url, layout.target.schema, timeouts)

    def close() -> None:
        ledger.close()
        conn.close()

    @contextmanager
    def transaction() -> Iterator[None]:
        with conn.transaction():
            yield

    return Store(rows, ledger, close, transaction)


__all__ = [
    "BatchRecord",
    "ConnectionLostError",
    "Failure",
    "Ledger",
    "MissingColumnsError",
    "PartitionSpec",
    "RowStore",
    "SchemaError",
    "Store",
    "StoreError",
    "TableLayout",
    "WriteStats",
    "open_store",
]
