"""One dynamic partitions definition per dataset, and the meaning of its keys.

ID-range keys are zero-padded inclusive bounds (``0000010000-0000019999``) so that they sort the way
they are added (ascending); archive keys are slugs of the archive values, using only ``[a-z0-9_-]``.
"""

from __future__ import annotations

import re

import dagster as dg

from .config import DatasetConfig
from .stores import PartitionSpec, RowStore, SchemaError

KEY_DIGITS = 10
_RANGE_KEY = re.compile(r"^(\d+)-(\d+)$")


def partitions_name(name: str) -> str:
    return f"{name}_partitions"


def partitions_def_for(name: str) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=partitions_name(name))


def range_key(bucket: int, width: int) -> str:
    lo = bucket * width
    return f"{lo:0{KEY_DIGITS}d}-{lo + width - 1:0{KEY_DIGITS}d}"


def slugify(value: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", value.lower()).strip("-")
    return slug[:120] or "archive"


def partition_spec(key: str, dataset: DatasetConfig, store: RowStore | None = None) -> PartitionSpec:
    """What ``key`` selects; archive keys are resolved against the store's archive values."""
    if dataset.partitioning.kind == "id_range":
        match = _RANGE_KEY.match(key)
        if not match:
            raise SchemaError(f"partition key {key!r} is not an id range like 0000010000-0000019999")
        return PartitionSpec(key=key, id_range=(int(match.group(1)), int(match.group(2))))
    if store is None:
        raise SchemaError("archive partitions need the store to resolve their archive value")
    values = [a for a, _ in store.archive_groups() if slugify(a) == key]
    if not values:
        raise SchemaError(f"no archive value of column {dataset.archive_column} has the slug {key!r}")
    if len(values) > 1:
        raise SchemaError(f"archive values {values} share the partition key {key!r}; rename one of them")
    return PartitionSpec(key=key, archive=values[0])


def partition_activity(store: RowStore, dataset: DatasetConfig, after_id: int | None = None) -> list[tuple[str, int]]:
    """``(partition key, max id)`` of each partition holding rows with id > ``after_id``, in key order."""
    if dataset.partitioning.kind == "id_range":
        width = dataset.partitioning.width
        return [(range_key(b, width), m) for b, m in store.id_buckets(width, after_id)]
    groups: dict[str, tuple[str, int]] = {}
    for archive, max_id in store.archive_groups(after_id):
        key = slugify(archive)
        if key in groups and groups[key][0] != archive:
            raise SchemaError(f"archive values {groups[key][0]!r} and {archive!r} share the partition key {key!r}")
        groups[key] = (archive, max_id)
    return [(k, m) for k, (_, m) in groups.items()]


def register_partitions(instance: dg.DagsterInstance, name: str, keys: list[str]) -> list[str]:
    """Add the keys not yet registered, in the given (ascending) order; return those added."""
    partitions = partitions_name(name)
    existing = set(instance.get_dynamic_partitions(partitions))
    new = [k for k in keys if k not in existing]
    if new:
        instance.add_dynamic_partitions(partitions, new)
    return new
