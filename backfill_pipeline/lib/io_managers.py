"""Intermediate results persisted per partition and run as Parquet.

A retried step reloads what its upstream already computed (and paid for) instead of recomputing it.
Files are scoped by run, ``<asset>/<partition>/<run id>.parquet``: two runs of one partition at once (a
backfill and the sensor) must never read each other's half of the work. An input is read from the run
that produced it, which for a re-execution is the parent run, and otherwise from the path recorded by the
latest materialization of that asset partition.

Written by hand rather than on ``dg.UPathIOManager`` because that class derives one path per asset
partition, with no room for the run.
"""

import os
import time

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

PATH_METADATA_KEY = "parquet_path"


class ParquetIOManager(dg.ConfigurableIOManager):
    """Parquet files under ``base_dir`` (any fsspec URL), by default the instance's storage directory."""

    base_dir: str | None = None
    retention_days: float = 7.0

    def _root(self, instance: dg.DagsterInstance) -> UPath:
        return UPath(self.base_dir or os.path.join(instance.storage_directory(), "backfill_parquet"))

    def _dir(self, instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None) -> UPath:
        return self._root(instance).joinpath(*asset_key.path, partition or "__unpartitioned__")

    def handle_output(self, context: dg.OutputContext, obj: pa.Table) -> None:
        if not isinstance(obj, pa.Table):
            raise TypeError(f"{context.asset_key.to_user_string()} returned {type(obj).__name__}, not a pyarrow Table")
        partition = context.partition_key if context.has_partition_key else None
        folder = self._dir(context.step_context.instance, context.asset_key, partition)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{context.run_id}.parquet"
        tmp = folder / f".{context.run_id}.parquet.tmp"
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

    def load_input(self, context: dg.InputContext) -> pa.Table:
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


def _read_if_there(path: UPath) -> pa.Table | None:
    """The table, or None when the file is not there (asked by reading: an object store client's cached
    listing may still show a file that is gone)."""
    try:
        with path.open("rb") as handle:
            return pq.read_table(handle)
    except FileNotFoundError:
        return None
