"""Intermediate results persisted per partition as Parquet, so a retried step reuses what its
upstream already computed (and paid for) instead of recomputing it."""

import os

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath


class _ParquetPathIOManager(dg.UPathIOManager):
    extension = ".parquet"

    def dump_to_path(self, context: dg.OutputContext, obj: pa.Table, path: UPath) -> None:
        if not isinstance(obj, pa.Table):
            raise TypeError(f"{context.asset_key.to_user_string()} returned {type(obj).__name__}, not a pyarrow Table")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as handle:
            pq.write_table(obj, handle, compression="zstd")
        tmp.rename(path)  # readers never see half a file
        context.add_output_metadata({"parquet_path": str(path), "parquet_rows": obj.num_rows})

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pa.Table:
        with path.open("rb") as handle:
            return pq.read_table(handle)


class ParquetIOManager(dg.ConfigurableIOManagerFactory):
    """Parquet files under ``base_dir`` (any fsspec URL), by default the instance's storage directory."""

    base_dir: str | None = None

    def create_io_manager(self, context: dg.InitResourceContext) -> _ParquetPathIOManager:
        base = self.base_dir or os.path.join(context.instance.storage_directory(), "backfill_parquet")
        return _ParquetPathIOManager(base_path=UPath(base))
