"""Intermediate results persisted per partition and run as Parquet.

A retried step reloads what its upstream already computed (and paid for) instead of recomputing it.
Files are scoped by run, ``<asset>/<partition>/<run id>.parquet``: two runs of one partition at once (a
backfill and the sensor) must never read each other's half of the work. An input is read from the run
that produced it, which for a re-execution is the parent run, and otherwise from the path recorded by the
latest materialization of that asset partition.

Written by hand rather than on ``dg.UPathIOManager`` because that class derives one path per asset
partition, with no room for the run. Outputs arrive as :class:`~backfill_pipeline.spool.Spool` files the
step wrote a batch at a time and are copied in as bytes; inputs are handed over as spools (a remote file is
first copied to a scratch file), so no step holds a whole partition in memory.
"""

import os
import shutil
import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from ..spool import Spool, scratch_path

PATH_METADATA_KEY = "parquet_path"


class ParquetIOManager(dg.ConfigurableIOManager):
    """Parquet files under ``base_dir`` (any fsspec URL), by default the instance's storage directory."""

    base_dir: str | None = None
    retention_days: float = 7.0

    def _root(self, instance: dg.DagsterInstance) -> UPath:
        return UPath(self.base_dir or os.path.join(instance.storage_directory(), "backfill_parquet"))

    def _dir(self, instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None) -> UPath:
        return self._root(instance).joinpath(*asset_key.path, partition or "__unpartitioned__")

    def handle_output(self, context: dg.OutputContext, obj: pa.Table | Spool) -> None:
        if not isinstance(obj, pa.Table | Spool):
            raise TypeError(
                f"{context.asset_key.to_user_string()} returned {type(obj).__name__}, not a pyarrow Table or Spool"
            )
        partition = context.partition_key if context.has_partition_key else None
        folder = self._dir(context.step_context.instance, context.asset_key, partition)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{context.run_id}.parquet"
        tmp = folder / f".{context.run_id}.parquet.tmp"
        if isinstance(obj, Spool):
            _store_spool(obj, tmp)
        else:
            with tmp.open("wb") as handle:
                pq.write_table(obj, handle, compression="zstd")
        tmp.rename(path)  # readers never see half a file
        self._prune(folder, keep=path)
        relative = "/".join([*context.asset_key.path, partition or "__unpartitioned__", path.name])
        context.add_output_metadata({PATH_METADATA_KEY: relative, "parquet_rows": obj.num_rows})

    def _prune(self, folder: UPath, keep: UPath) -> None:
        """Drop other runs' files older than the retention period (recent ones may still be in use)."""
        cutoff = time.time() - self.retention_days * 86400
        for entry in folder.iterdir():
            try:
                if entry != keep and entry.stat().st_mtime < cutoff:
                    entry.unlink()
            except (FileNotFoundError, NotImplementedError):
                continue

    def load_input(self, context: dg.InputContext) -> Spool:
        asset_key = context.asset_key
        partition = context.asset_partition_key if context.has_asset_partitions else None
        instance = context.instance
        upstream_run = context.upstream_output.run_id if context.upstream_output else None
        looked: list[str] = []
        if upstream_run:
            path = self._dir(instance, asset_key, partition) / f"{upstream_run}.parquet"
            table = _read_if_there(path)
            if table is not None:
                return table
            looked.append(str(path))
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition] if partition else None), limit=1
        ).records
        materialization = records[0].asset_materialization if records else None
        recorded = materialization.metadata.get(PATH_METADATA_KEY) if materialization else None
        if recorded is not None:
            path = self._recorded(instance, str(recorded.value))
            table = _read_if_there(path)
            if table is not None:
                return table
            looked.append(str(path))
        where = f" (looked for {' and '.join(dict.fromkeys(looked))})" if looked else ""
        raise dg.Failure(
            description=f"no stored result of {asset_key.to_user_string()} for partition {partition}{where}: "
            "materialize it (or the whole graph for this partition) first; steps on other machines must share "
            "execution.intermediates",
            allow_retries=False,
        )

    def _recorded(self, instance: dg.DagsterInstance, recorded: str) -> UPath:
        """A recorded path: relative to the root (where it may live on any machine), or absolute (older)."""
        if "://" in recorded or recorded.startswith("/"):
            return UPath(recorded)
        return self._root(instance).joinpath(*recorded.split("/"))


_CHUNK = 8 << 20


def _store_spool(spool: Spool, target: UPath) -> None:
    """The step's spool file becomes the stored intermediate: moved when it is on the same local disk,
    else copied through a buffer (any filesystem), never read whole."""
    if spool.owned and _is_local(target):
        try:
            os.replace(spool.path, target.path)
            return
        except OSError:  # another device: copy
            pass
    with open(spool.path, "rb") as source, target.open("wb") as handle:
        shutil.copyfileobj(source, handle, _CHUNK)
    spool.discard()


def _is_local(path: UPath) -> bool:
    return path.protocol in ("", "file", "local")


def _read_if_there(path: UPath) -> Spool | None:
    """The stored table as a spool (a remote one copied to a scratch file first), or None when the file is
    not there (asked by reading: an object store client's cached listing may still show a file that is gone)."""
    if _is_local(path):
        local = Path(path.path)
        return Spool(local) if local.is_file() else None
    copy = scratch_path()
    try:
        with path.open("rb") as source, open(copy, "wb") as target:
            shutil.copyfileobj(source, target, _CHUNK)
    except FileNotFoundError:
        copy.unlink(missing_ok=True)
        return None
    return Spool(copy, owned=True)
