"""Each dataset's partitions, and the meaning of their keys.

- ``id_range`` (dynamic): zero-padded inclusive bounds (``0000010000-0000019999``), added ascending so they
  sort the way they were added.
- ``hash`` (static): ``h00``…``h63``, a stable hash of the key's text, for UUID and text keys.
- ``time`` (Dagster's daily, weekly or monthly partitions, UTC): the UTC day of ``partitioning.column``.
- ``archive`` (dynamic): slugs of the archive values (only ``[a-z0-9_-]``); rows without one are ``__null__``.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING

from .config import DatasetConfig
from .stores import PartitionSpec, RowStore, SchemaError
from .stores.groups import Grouping, WorkTest, hash_bucket

if TYPE_CHECKING:  # Dagster is imported where it is used: the CLI reaches its first paid requests without it
    import dagster as dg

KEY_DIGITS = 10
NULL_ARCHIVE_KEY = "__null__"
_RANGE_KEY = re.compile(r"^(\d+)-(\d+)$")


def partitions_name(name: str) -> str:
    return f"{name}_partitions"


def is_dynamic(dataset: DatasetConfig) -> bool:
    """Whether keys are registered as rows appear (id ranges, archives) or known from the config."""
    return dataset.partitioning.kind in ("id_range", "archive")


def partitions_def_for(name: str, dataset: DatasetConfig | None = None) -> dg.PartitionsDefinition:
    import dagster as dg

    spec = dataset.partitioning if dataset is not None else None
    if spec is None or spec.kind in ("id_range", "archive"):
        return dg.DynamicPartitionsDefinition(name=partitions_name(name))
    if spec.kind == "hash":
        return dg.StaticPartitionsDefinition([hash_key(b, spec.buckets) for b in range(spec.buckets)])
    # end_offset=1: today's (this week's, month's) partition exists, so new rows are embedded the day they come
    kinds = {"day": dg.DailyPartitionsDefinition, "week": dg.WeeklyPartitionsDefinition}
    return kinds.get(spec.granularity, dg.MonthlyPartitionsDefinition)(
        start_date=spec.start or "", timezone="UTC", end_offset=1
    )


def grouping_of(dataset: DatasetConfig) -> Grouping:
    spec = dataset.partitioning
    return Grouping(kind=spec.kind, width=spec.width, buckets=spec.buckets, column=spec.column)


def range_key(bucket: int, width: int) -> str:
    lo = bucket * width
    return f"{lo:0{KEY_DIGITS}d}-{lo + width - 1:0{KEY_DIGITS}d}"


def hash_key(bucket: int, buckets: int) -> str:
    return f"h{bucket:0{len(str(buckets - 1))}d}"


def slugify(value: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", value.lower()).strip("-")
    return slug[:120] or "archive"


def _as_day(value: object) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def _window_start(day: date, granularity: str) -> date:
    if granularity == "week":  # Dagster's weekly partitions start on Sundays
        return day - timedelta(days=(day.weekday() + 1) % 7)
    return day.replace(day=1) if granularity == "month" else day


def _window_end(start: date, granularity: str) -> date:
    if granularity == "month":
        return (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    return start + timedelta(days=7 if granularity == "week" else 1)


def time_key(value: object, dataset: DatasetConfig) -> str | None:
    """The time partition of a row's UTC day; None before the first partition or after the current one."""
    spec = dataset.partitioning
    start = _window_start(_as_day(value), spec.granularity)
    first = date.fromisoformat(spec.start or "")
    if spec.granularity == "week":
        first = first + timedelta(days=(6 - first.weekday()) % 7)  # the first Sunday on or after start
    elif spec.granularity == "month" and first.day != 1:
        first = _window_end(first.replace(day=1), "month")
    today = datetime.now(timezone.utc).date()
    return start.isoformat() if first <= start <= today else None


def key_of_group(group: object, dataset: DatasetConfig) -> str | None:
    """The partition key of a group value from the store's aggregate queries."""
    kind = dataset.partitioning.kind
    if kind == "id_range":
        return range_key(int(group), dataset.partitioning.width)  # type: ignore[call-overload]
    if kind == "hash":
        return hash_key(int(group), dataset.partitioning.buckets)  # type: ignore[call-overload]
    if kind == "time":
        return None if group is None else time_key(group, dataset)
    return NULL_ARCHIVE_KEY if group is None else slugify(str(group))


def key_of_id(id_text: str, dataset: DatasetConfig, store: RowStore) -> str | None:
    """The partition holding the row with this id (its text form), None if no partition does."""
    kind = dataset.partitioning.kind
    if kind == "hash":
        return hash_key(hash_bucket(id_text, dataset.partitioning.buckets), dataset.partitioning.buckets)
    if kind == "id_range" and id_text.lstrip("-").isdigit():
        return range_key(int(id_text) // dataset.partitioning.width, dataset.partitioning.width)
    groups = store.queries().groups_of(grouping_of(dataset), [id_text])
    return key_of_group(groups[id_text], dataset) if id_text in groups else None


def partition_spec(key: str, dataset: DatasetConfig, store: RowStore | None = None) -> PartitionSpec:
    """What ``key`` selects; archive keys are resolved against the store's archive values."""
    spec = dataset.partitioning
    if spec.kind == "id_range":
        match = _RANGE_KEY.match(key)
        if not match:
            raise SchemaError(f"partition key {key!r} is not an id range like 0000010000-0000019999")
        return PartitionSpec(key=key, id_range=(int(match.group(1)), int(match.group(2))))
    if spec.kind == "hash":
        keys = [hash_key(b, spec.buckets) for b in range(spec.buckets)]
        if key not in keys:
            raise SchemaError(f"partition key {key!r} is not one of the hash partitions {keys[0]}…{keys[-1]}")
        return PartitionSpec(key=key, bucket=(keys.index(key), spec.buckets))
    if spec.kind == "time":
        try:
            start = date.fromisoformat(key)
        except ValueError:
            raise SchemaError(f"partition key {key!r} is not a date like 2024-01-31") from None
        if _window_start(start, spec.granularity) != start:
            raise SchemaError(f"partition key {key!r} does not start a {spec.granularity}")
        window = (start, _window_end(start, spec.granularity))
        return PartitionSpec(key=key, window=window, window_column=spec.column)
    if key == NULL_ARCHIVE_KEY:
        return PartitionSpec(key=key, null_archive=True)
    if store is None:
        raise SchemaError("archive partitions need the store to resolve their archive value")
    values = [str(g) for g, _, _ in store.queries().groups(grouping_of(dataset)) if g is not None]
    matching = [a for a in values if slugify(a) == key]
    if not matching:
        raise SchemaError(f"no archive value of column {dataset.archive_column} has the slug {key!r}")
    if len(matching) > 1:
        raise SchemaError(f"archive values {matching} share the partition key {key!r}; rename one of them")
    return PartitionSpec(key=key, archive=matching[0])


def _keyed(groups: list[tuple], dataset: DatasetConfig) -> list[tuple[str, int, object]]:
    """``(key, rows, max id)`` merged by key, in the order of the groups; groups outside every partition
    (time before ``start``) are left out. Two archive values with one slug are an error."""
    merged: dict[str, list] = {}
    seen: dict[str, object] = {}
    for group, rows, max_id in groups:
        key = key_of_group(group, dataset)
        if key is None:
            continue
        if dataset.partitioning.kind == "archive" and key in seen and seen[key] != group:
            raise SchemaError(f"archive values {seen[key]!r} and {group!r} share the partition key {key!r}")
        seen[key] = group
        if key in merged:
            merged[key][1] += int(rows)
            merged[key][2] = max(merged[key][2], max_id) if max_id is not None else None
        else:
            merged[key] = [key, int(rows), max_id]
    return [(k, r, m) for k, r, m in merged.values()]


def partition_activity(store: RowStore, dataset: DatasetConfig, after_id: int | None = None) -> list[tuple[str, int]]:
    """``(partition key, marker)`` of each partition holding rows (with id > ``after_id``), in key order:
    the marker is the largest id for integer keys, else the number of rows."""
    groups = store.queries().groups(grouping_of(dataset), after_id)
    keyed = _keyed(groups, dataset)
    if dataset.partitioning.kind != "archive":
        keyed.sort(key=lambda item: item[0])
    return [(k, int(str(m)) if m is not None else r) for k, r, m in keyed]


def work_test(dataset: DatasetConfig) -> WorkTest:
    return WorkTest(
        model=dataset.embedding.model,
        dimension=dataset.embedding.dimension,
        enrichment_model=dataset.enrichment.model if dataset.enrichment.enabled else None,
        redo_unhashed=dataset.unhashed_rows == "redo",
        cooldown_hours=dataset.failure_cooldown_hours,
    )


def pending_partitions(store: RowStore, dataset: DatasetConfig) -> list[tuple[str, int]]:
    """``(key, rows needing work)`` of every partition holding such rows, from one aggregate query. Rows
    cooling down after a failure are left out; edited text is found by change tracking or a run."""
    groups = [(g, n, None) for g, n in store.queries().pending(grouping_of(dataset), work_test(dataset))]
    return sorted((k, r) for k, r, _ in _keyed(groups, dataset))


def partition_keys(instance: dg.DagsterInstance, name: str, dataset: DatasetConfig) -> list[str]:
    """Every partition Dagster knows: the registered ones, or all of a static or time definition."""
    if is_dynamic(dataset):
        return list(instance.get_dynamic_partitions(partitions_name(name)))
    return list(partitions_def_for(name, dataset).get_partition_keys(dynamic_partitions_store=instance))


def register_partitions(instance: dg.DagsterInstance, name: str, keys: list[str]) -> list[str]:
    """Add the keys not yet registered, in the given (ascending) order; return those added."""
    partitions = partitions_name(name)
    existing = set(instance.get_dynamic_partitions(partitions))
    new = [k for k in keys if k not in existing]
    if new:
        instance.add_dynamic_partitions(partitions, new)
    return new
