"""What the sensor's tick asks for: the partitions holding new, edited or deleted rows, found without
reading the whole table, as plain values (the Dagster sensor is a thin wrapper around :func:`sensor_tick`).

The cursor is a small JSON document naming how changes are found:

- ``queue``: the change-capture trigger's queue (``change_tracking.trigger``), up to entry ``seq``;
- ``updated_at``: rows whose ``(updated_at, id)`` is past the cursor (``change_tracking.updated_at_column``);
- ``id``: rows with an id past the largest seen (integer keys, nothing else configured: inserts only);
- ``pending``: partitions holding rows that need work, by one aggregate query each tick (other keys).

The first tick (no cursor) requests a run for every partition holding rows that need work, so
partitions registered before the sensor started are not left behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .config import DatasetConfig
from .partitions import grouping_of, is_dynamic, key_of_group, partition_activity, pending_partitions
from .stores import Store


@dataclass
class Tick:
    runs: list[tuple[str, str]] = field(default_factory=list)  # (partition key, run key)
    new_keys: list[str] = field(default_factory=list)  # dynamic partitions to register
    cursor: str | None = None
    note: str = ""


def change_mode(dataset: DatasetConfig, integer_ids: bool) -> str:
    tracking = dataset.change_tracking
    if tracking.trigger:
        return "queue"
    if tracking.updated_at_column:
        return "updated_at"
    return "id" if integer_ids else "pending"


def read_cursor(text: str | None) -> dict | None:
    if not text:
        return None
    if text.lstrip("-").isdigit():  # the cursor of earlier versions: the largest id
        return {"mode": "id", "id": int(text)}
    return json.loads(text)


def _safe(value: object) -> str:
    return "".join(c if c.isalnum() or c in "-_.:" else "_" for c in str(value))


def sensor_tick(name: str, dataset: DatasetConfig, store: Store, cursor_text: str | None, registered: set[str]) -> Tick:
    rows = store.rows
    mode = change_mode(dataset, rows.integer_ids())
    cursor = read_cursor(cursor_text)
    if cursor is None or cursor.get("mode") != mode:
        # every partition holding rows, read once: registered (dynamic) and the id cursor's start
        activity = partition_activity(rows, dataset) if is_dynamic(dataset) or mode == "id" else []
        tick = _first_tick(name, dataset, store, mode, activity)
        if is_dynamic(dataset):
            tick.new_keys = [k for k, _ in activity if k not in registered]
    elif mode == "queue":
        tick = _queue_tick(name, dataset, store, int(cursor["seq"]))
    elif mode == "updated_at":
        tick = _updated_tick(name, dataset, store, (cursor["at"], cursor["key"]))
    elif mode == "id":
        tick = _id_tick(name, dataset, store, int(cursor["id"]))
    else:
        tick = _pending_tick(name, dataset, store)
    if is_dynamic(dataset):  # every partition holding rows is registered, runs or not
        added = [k for k, _ in tick.runs if k not in registered and k not in tick.new_keys]
        tick.new_keys = list(dict.fromkeys(tick.new_keys + added))
    return tick


def _first_tick(name: str, dataset: DatasetConfig, store: Store, mode: str, activity: list[tuple[str, int]]) -> Tick:
    pending = pending_partitions(store.rows, dataset)
    runs = [(key, f"{name}:{key}@first-{count}") for key, count in pending]
    cursor: dict = {"mode": mode}
    if mode == "queue":
        groups, upto = store.rows.queued_groups(grouping_of(dataset), -1)
        cursor["seq"] = upto
        queued = {k for k in (key_of_group(g, dataset) for g, _ in groups) if k}
        runs += [(k, f"{name}:{k}@q{upto}") for k in sorted(queued - {k for k, _ in runs})]
    elif mode == "updated_at":
        column = dataset.change_tracking.updated_at_column or ""
        _, newest = store.rows.queries().changed(grouping_of(dataset), column, None)
        cursor.update(_newest(newest))
    elif mode == "id":
        cursor["id"] = max((m for _, m in activity), default=None)
    return Tick(runs, cursor=json.dumps(cursor), note=f"first tick: {len(pending)} partitions hold rows needing work")


def _newest(newest: list[tuple]) -> dict:
    if not newest:
        return {"at": None, "key": None}
    at, key = newest[0]
    return {"at": at.isoformat() if hasattr(at, "isoformat") else str(at), "key": str(key)}


def _keys(groups: list[tuple], dataset: DatasetConfig) -> list[tuple[str, int]]:
    found: dict[str, int] = {}
    for group, count in groups:
        key = key_of_group(group, dataset)
        if key is not None:
            found[key] = found.get(key, 0) + int(count)
    return sorted(found.items())


def _queue_tick(name: str, dataset: DatasetConfig, store: Store, seq: int) -> Tick:
    store.rows.acknowledge_queue(seq)  # Dagster stored this cursor: those entries are done with
    groups, upto = store.rows.queued_groups(grouping_of(dataset), seq)
    keys = _keys(groups, dataset)
    runs = [(k, f"{name}:{k}@q{upto}") for k, _ in keys]
    note = f"{sum(n for _, n in keys)} queued rows in {len(keys)} partitions"
    return Tick(runs, cursor=json.dumps({"mode": "queue", "seq": upto}), note=note)


def _updated_tick(name: str, dataset: DatasetConfig, store: Store, after: tuple) -> Tick:
    column = dataset.change_tracking.updated_at_column or ""
    since = None if after[0] is None else after
    groups, newest = store.rows.queries().changed(grouping_of(dataset), column, since)
    if not newest:
        return Tick(cursor=None, note=f"no rows changed since {after[0]}")
    position = _newest(newest)
    keys = _keys(groups, dataset)
    runs = [(k, f"{name}:{k}@{_safe(position['at'])}-{_safe(position['key'])}") for k, _ in keys]
    note = f"{sum(n for _, n in keys)} rows changed since {after[0]} in {len(keys)} partitions"
    return Tick(runs, cursor=json.dumps({"mode": "updated_at", **position}), note=note)


def _id_tick(name: str, dataset: DatasetConfig, store: Store, after_id: int | None) -> Tick:
    activity = partition_activity(store.rows, dataset, after_id)
    if not activity:
        return Tick(cursor=None, note=f"no rows with id > {after_id}")
    runs = [(k, f"{name}:{k}@{m}") for k, m in activity]
    newest = max(m for _, m in activity)
    return Tick(runs, cursor=json.dumps({"mode": "id", "id": newest}), note=f"{len(runs)} partitions gained rows")


def _pending_tick(name: str, dataset: DatasetConfig, store: Store) -> Tick:
    pending = pending_partitions(store.rows, dataset)
    sizes = dict(partition_activity(store.rows, dataset)) if pending else {}
    runs = [(k, f"{name}:{k}@p{count}-{sizes.get(k, 0)}") for k, count in pending]
    return Tick(runs, cursor=None, note=f"{len(pending)} partitions hold rows needing work")
