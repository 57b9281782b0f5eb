"""The commands that go over the datasets one by one (coverage, status, migrate, register): one dataset's
database problem is one line on stderr and the others are still done."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TypeVar

from .cli_tables import COVERAGE_HEADERS, coverage_json, coverage_rows, print_table
from .config import BackfillConfig, ConfigError, DatasetConfig
from .partitions import is_dynamic, partition_activity, register_partitions
from .redact import mask_secrets
from .stores import StoreError, open_store


def datasets_of(config: BackfillConfig, only: str | None) -> dict[str, DatasetConfig]:
    if only is None:
        return dict(config.datasets)
    if only not in config.datasets:
        raise ConfigError(f"no dataset named {only!r}; the config has {', '.join(config.datasets)}")
    return {only: config.datasets[only]}


T = TypeVar("T")
EXACT = (
    "read and detect every row, as a run would (default: the database counts, and only rows needing work are "
    "read; on Postgres it does not see constant or sequential placeholders of the right length)"
)


def each_dataset(
    config: BackfillConfig, args: argparse.Namespace, work: Callable[[str, DatasetConfig], T]
) -> tuple[list[T], int]:
    """``work`` for every dataset; one dataset's database problem is one line on stderr, and the others are
    still done (exit status 2 then); ``--debug`` stops at the first, with its traceback."""
    done, status = [], 0
    for name, dataset in datasets_of(config, args.dataset).items():
        try:
            done.append(work(name, dataset))
        except StoreError as exc:
            if args.debug:
                raise
            print(f"error: {mask_secrets(str(exc))}", file=sys.stderr)
            status = 2
    return done, status


def cmd_coverage(config: BackfillConfig, args: argparse.Namespace) -> int:
    tables, status = each_dataset(
        config, args, lambda n, d: coverage_rows(n, d, args.by_partition or args.json, exact=args.exact)
    )
    rows = [row for table in tables for row in table]
    if args.json:
        print(json.dumps([coverage_json(r) for r in rows], indent=2))
    elif rows:
        print_table(COVERAGE_HEADERS, rows)
    return status


def _status_of(name: str, dataset: DatasetConfig, exact: bool = False) -> dict:
    rows = coverage_rows(name, dataset, by_partition=True, exact=exact)
    with open_store(name, dataset) as store:
        failures = store.ledger.failure_classes()
    *parts, total = [coverage_json(r) for r in rows]
    return {**total, "partition": None, "failures": failures, "partitions": parts}


def cmd_status(config: BackfillConfig, args: argparse.Namespace) -> int:
    """For scripts and monitors: coverage by dataset and partition, rows by reason, failures by class."""
    out, status = each_dataset(config, args, lambda name, dataset: _status_of(name, dataset, args.exact))
    print(json.dumps(out, indent=2))
    return status


def migrate_dataset(name: str, dataset: DatasetConfig) -> None:
    with open_store(name, dataset) as store:
        added = store.migrate()
    print(f"{name}: {'added ' + ', '.join(added) if added else 'schema already up to date'}")


def cmd_migrate(config: BackfillConfig, args: argparse.Namespace) -> int:
    return each_dataset(config, args, migrate_dataset)[1]


def register_dataset(name: str, dataset: DatasetConfig) -> list[str]:
    with open_store(name, dataset) as store:
        keys = [k for k, _ in partition_activity(store.rows, dataset)]
    if not is_dynamic(dataset):
        kind = dataset.partitioning.kind
        print(f"{name}: {len(keys)} {kind} partitions hold rows (defined by the config; nothing to register)")
        return keys
    from .cli_runs import cli_instance

    added = register_partitions(cli_instance(), name, keys)
    print(f"{name}: {len(keys)} partitions ({len(added)} newly registered)")
    return keys


def register_all(config: BackfillConfig, only: str | None = None) -> dict[str, list[str]]:
    return {name: register_dataset(name, dataset) for name, dataset in datasets_of(config, only).items()}


def cmd_register(config: BackfillConfig, args: argparse.Namespace) -> int:
    return each_dataset(config, args, register_dataset)[1]
