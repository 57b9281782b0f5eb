"""A partition's table on disk, written and read in row groups, so a step's memory is bounded by the
rows it holds at once (``rows_in_memory``), not by the partition's width.

Each step reads its inputs as :class:`Spool` s (Parquet files read batch by batch with
``ParquetFile.iter_batches``) and writes its output through a :class:`SpoolWriter` (``ParquetWriter``,
one row group per batch); the IO manager moves the finished file to the intermediates' store.
"""

from __future__ import annotations

import atexit
import ctypes
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

_scratch: Path | None = None


def scratch_dir() -> Path:
    """This process's folder for spools (under ``TMPDIR``), removed when the process exits."""
    global _scratch
    if _scratch is None or not _scratch.exists():
        _scratch = Path(tempfile.mkdtemp(prefix="backfill_spool_"))
        atexit.register(shutil.rmtree, _scratch, True)
    return _scratch


def scratch_path(suffix: str = ".parquet") -> Path:
    return scratch_dir() / f"{uuid.uuid4().hex}{suffix}"


class Spool:
    """A Parquet file read a batch at a time; ``owned`` files (scratch copies) are deleted by :meth:`discard`."""

    def __init__(self, path: Path, *, owned: bool = False):
        self.path = path
        self.owned = owned
        # read a column chunk through a small buffer, never the whole file ahead: pre-buffered row groups
        # stay in memory until the file is closed
        self._file = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)

    @property
    def schema(self) -> pa.Schema:
        return self._file.schema_arrow

    @property
    def num_rows(self) -> int:
        return self._file.metadata.num_rows

    @property
    def column_names(self) -> list[str]:
        return self.schema.names

    def batches(self, rows: int, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The rows in order, ``rows`` at a time, as tables (empty file: nothing)."""
        for batch in self._file.iter_batches(batch_size=rows, columns=columns):
            yield pa.Table.from_batches([batch])

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """Whole columns at once: for narrow ones (ids, reasons, error messages)."""
        return self._file.read(columns=columns)

    def column(self, name: str) -> pa.ChunkedArray:
        return self.read([name]).column(name)

    def discard(self) -> None:
        if self.owned:
            self.path.unlink(missing_ok=True)


class SpoolWriter:
    """Appends tables to a scratch Parquet file; :meth:`finish` closes it and returns it as a :class:`Spool`."""

    def __init__(self, schema: pa.Schema):
        self.schema = schema
        self.path = scratch_path()
        # dictionary pages only for strings (reasons, models): tried on vectors, they cost twice the write
        strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        self._writer = pq.ParquetWriter(self.path, schema, compression="zstd", use_dictionary=strings)
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table.cast(self.schema) if table.schema != self.schema else table)
            self.rows += table.num_rows

    def finish(self) -> Spool:
        self._writer.close()
        return Spool(self.path, owned=True)

    def abandon(self) -> None:
        self._writer.close()
        self.path.unlink(missing_ok=True)


def spool_of(table: pa.Table) -> Spool:
    """A table already in memory as a spool (empty results, tests)."""
    writer = SpoolWriter(table.schema)
    writer.write(table)
    return writer.finish()


def as_spool(value: pa.Table | Spool) -> Spool:
    return value if isinstance(value, Spool) else spool_of(value)


def windows(parts: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Regroup tables (filtered batches of varying size) into tables of ``rows`` rows, the last shorter:
    the provider steps work a full window at a time however sparse the rows needing work are."""
    held: list[pa.Table] = []
    count = 0
    for part in parts:
        while part.num_rows:
            take = min(rows - count, part.num_rows)
            held.append(part.slice(0, take))
            count += take
            part = part.slice(take)
            if count == rows:
                yield pa.concat_tables(held).combine_chunks()
                held, count = [], 0
    if count:
        yield pa.concat_tables(held).combine_chunks()


def rows_where(spool: Spool, flag: str, rows: int, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The spool's rows whose boolean column ``flag`` is true, in windows of ``rows``."""
    wanted = None if columns is None else list(dict.fromkeys([*columns, flag]))
    return windows((b.filter(pc.field(flag)) for b in spool.batches(rows, wanted)), rows)


def release_memory() -> None:
    """Hand memory freed by a finished window back to the system: Arrow's pool keeps freed buffers, and
    glibc's allocator keeps freed heap pages in its per-thread arenas (a no-op elsewhere)."""
    pa.default_memory_pool().release_unused()
    if _libc is not None:
        _libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_libc = _glibc() if sys.platform.startswith("linux") else None


def count_true(spool: Spool, flag: str) -> int:
    return int(pc.sum(spool.column(flag)).as_py() or 0)
