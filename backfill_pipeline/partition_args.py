"""Partitions as operators name them on the command line: a key, an archive value as stored, or a row id.

An unknown name is one line that lists the nearest keys, never a ``DagsterUnknownPartitionError``.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from .config import ConfigError, DatasetConfig
from .partitions import (
    is_dynamic,
    key_of_id,
    partition_activity,
    partition_keys,
    register_partitions,
    slugify,
)
from .stores import open_store

if TYPE_CHECKING:
    import dagster as dg


def resolve_partition(given: str, name: str, dataset: DatasetConfig, known: list[str]) -> str:
    """The key ``given`` names: itself, or the slug of an archive value written as stored."""
    if given in known:
        return given
    if dataset.partitioning.kind == "archive" and slugify(given) in known:
        return slugify(given)
    near = difflib.get_close_matches(given, known, n=3, cutoff=0.5) or difflib.get_close_matches(
        slugify(given), known, n=3, cutoff=0.5
    )
    hint = f"; nearest: {', '.join(near)}" if near else ""
    what = "registered partitions" if is_dynamic(dataset) else "partitions"
    if not known:
        hint = "; run `backfill-pipeline register` first" if is_dynamic(dataset) else ""
    raise ConfigError(f"dataset '{name}': no partition {given!r} among its {len(known)} {what}{hint}")


def partitions_of_ids(instance: dg.DagsterInstance, name: str, dataset: DatasetConfig, ids: list[str]) -> list[str]:
    """The partitions holding these rows (registered if they were not yet), in the order given."""
    keys: list[str] = []
    with open_store(name, dataset) as store:
        for row_id in ids:
            key = key_of_id(row_id, dataset, store.rows)
            if key is None:
                raise ConfigError(f"dataset '{name}': no row with id {row_id!r} is in any partition")
            keys.append(key)
    keys = list(dict.fromkeys(keys))
    if is_dynamic(dataset):
        register_partitions(instance, name, keys)
    return keys


def partitions_to_run(
    instance: dg.DagsterInstance,
    name: str,
    dataset: DatasetConfig,
    given: list[str] | None,
    of_ids: list[str] | None,
) -> list[str]:
    """What ``materialize`` runs: the partitions named, those holding the ids named, or every partition
    holding rows (registered ones for id ranges and archives)."""
    if given or of_ids:
        known = partition_keys(instance, name, dataset)
        named = [resolve_partition(g, name, dataset, known) for g in given or []]
        return list(dict.fromkeys(named + (partitions_of_ids(instance, name, dataset, of_ids) if of_ids else [])))
    known = partition_keys(instance, name, dataset)
    if is_dynamic(dataset):
        return known
    with open_store(name, dataset) as store:
        holding_rows = {key for key, _ in partition_activity(store.rows, dataset)}
    return [key for key in known if key in holding_rows]


def named_partitions(name: str, dataset: DatasetConfig, given: list[str] | None) -> list[str] | None:
    """The keys of partitions named on the command line, among those holding rows (registered or not)."""
    if not given:
        return None
    with open_store(name, dataset) as store:
        holding_rows = [key for key, _ in partition_activity(store.rows, dataset)]
    return list(dict.fromkeys(resolve_partition(g, name, dataset, holding_rows) for g in given))
