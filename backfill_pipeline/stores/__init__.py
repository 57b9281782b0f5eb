"""Opening the right store for a dataset's database URL."""

from __future__ import annotations

from urllib.parse import urlsplit

from ..config import DatasetConfig
from .base import (
    ConnectionLostError,
    Failure,
    MissingColumnsError,
    PartitionSpec,
    SchemaError,
    Store,
    StoreError,
    WriteStats,
)


def open_store(name: str, dataset: DatasetConfig, url: str | None = None) -> Store:
    """Open the dataset's store; ``url`` (from a resource) overrides the config's URL."""
    url = url or dataset.database_url_value()
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(name, dataset, url)
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        from .postgres import PostgresStore

        return PostgresStore(name, dataset, url)
    raise StoreError(f"dataset '{name}': unsupported database URL scheme {scheme!r}")


__all__ = [
    "ConnectionLostError",
    "SchemaError",
    "Failure",
    "MissingColumnsError",
    "PartitionSpec",
    "Store",
    "StoreError",
    "WriteStats",
    "open_store",
]
