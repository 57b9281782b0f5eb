"""``backfill-pipeline``: the operator's commands around the Dagster code location.

``demo`` is the one-command tour: create the demo database, register its partitions, show coverage,
materialize every partition of the whole graph through Dagster, and show coverage again.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from . import head_start, stopping
from .cli_datasets import (
    EXACT,
    cmd_coverage,
    cmd_migrate,
    cmd_register,
    cmd_status,
    datasets_of,
    each_dataset,
    register_all,
)
from .cli_tables import COVERAGE_HEADERS, coverage_rows, print_table
from .config import BackfillConfig, ConfigError, demo_config_path, load_config
from .partition_args import named_partitions, partitions_to_run
from .partitions import is_dynamic
from .plan import plan_dataset
from .redact import mask_secrets
from .run_summary import RunSummary
from .stores import StoreError, open_store
from .stores.sqlite_rows import sqlite_path


def cli_instance():  # noqa: ANN201 - a DagsterInstance: Dagster is imported by the commands that need it
    from .cli_runs import cli_instance as instance

    return instance()


def cmd_create_demo_db(config: BackfillConfig, args: argparse.Namespace) -> int:
    from .demo_data import create_demo_database

    path = Path(args.path) if args.path else sqlite_path(config.datasets["jobs"].database_url_value())
    if path.exists() and not args.force:
        print(f"{path} exists; pass --force to recreate it")
        return 1
    create_demo_database(path, rows=args.rows, seed=args.seed, embedding=config.datasets["jobs"].embedding)
    with open_store("jobs", config.datasets["jobs"], f"sqlite:///{path}") as store:
        store.migrate()
    print(f"created {path} with {args.rows} job postings (seed {args.seed})")
    return 0


def cmd_materialize(config: BackfillConfig, args: argparse.Namespace) -> int:
    stopping.reset()
    stopping.exit_on_second_signal()
    asked = head_start.Asked(args.force, args.limit, tuple(args.partition or ()), bool(args.partition_of))
    head = head_start.begin(config, args.dataset, asked, enabled=not args.no_head_start)  # before Dagster is imported
    try:
        return _materialize(config, args, head)
    finally:
        if head is not None:  # an error before the runs: it pays for nothing and ends
            head.cancel()


def _materialize(config: BackfillConfig, args: argparse.Namespace, head: head_start.HeadStart | None) -> int:
    ok = True
    from .cli_materialize import materialize_partitions
    from .cli_runs import fail_dead_cli_runs

    instance = cli_instance()
    for run_id in fail_dead_cli_runs(instance):
        print(f"run {run_id[:8]} was left unfinished by a process that is gone; marked failed")
    keys_of = {
        name: partitions_to_run(instance, name, dataset, args.partition, args.partition_of)
        for name, dataset in datasets_of(config, args.dataset).items()
    }
    limits_of: dict[str, dict[str, int] | None] = {name: None for name in keys_of}
    if args.limit:  # the whole run does at most --limit rows of work: shared over partitions in order
        for name, dataset in datasets_of(config, args.dataset).items():
            plan = plan_dataset(name, dataset, force=args.force, keys=keys_of[name], limit=args.limit)
            limits_of[name] = {k: n for k, n in plan.work_by_partition.items() if n}
            keys_of[name] = list(limits_of[name] or {})
    if not _confirmed(config, args, keys_of):
        print("nothing done")
        if head is not None:
            head.finish(sys.stderr)
        return 1
    if head is not None:  # the partitions of the first dataset, settled and confirmed: it may pay
        head.go(keys_of.get(head.name, []))
    summary, started = RunSummary(), time.monotonic()
    lines = sys.stderr if args.json else sys.stdout  # with --json, stdout holds the JSON document alone
    for name, keys in keys_of.items():
        if not keys:
            why = (
                "no partitions registered; run `backfill-pipeline register` first"
                if is_dynamic(config.datasets[name])
                else "no partition holds rows"
            )
            print(f"{name}: {why}", file=lines)
            ok = False
            continue
        ok &= materialize_partitions(
            args.config, name, keys, force=args.force, limits=limits_of[name], parallel=args.parallel,
            summary=summary, out=lines,
        )  # fmt: skip
    if head is not None:
        summary.totals.update(head.finish(lines))
    summary.seconds = time.monotonic() - started
    status = stopping.EXIT_AT_ONCE if stopping.requested() else 0 if ok else 1
    if args.json:
        print(json.dumps({**summary.as_dict(), "stopped": stopping.requested(), "exit_status": status}, indent=2))
        return status
    print("\n".join(summary.lines()))
    if stopping.requested():
        print(
            f"stopped by {stopping.reason()}: what was completed is written; run the same command again to "
            "continue (rows already done are not paid for again)"
        )
    return status


def cmd_plan(config: BackfillConfig, args: argparse.Namespace) -> int:
    """Dry run: what needs work and what it would cost, without calling a provider or writing."""
    plans, status = each_dataset(
        config,
        args,
        lambda name, dataset: plan_dataset(
            name,
            dataset,
            force=args.force,
            keys=named_partitions(name, dataset, args.partition),
            limit=args.limit,
            exact=args.exact,
        ),
    )
    if args.json:
        print(json.dumps([p.as_dict() for p in plans], indent=2))
        return status
    for plan in plans:
        print("\n".join(plan.lines()))
    print("dry run: no provider was called and nothing was written")
    return status


def _confirmed(config: BackfillConfig, args: argparse.Namespace, keys: dict[str, list[str]]) -> bool:
    """At a terminal, show the plan and ask before anything is paid for; scripts and CI are not asked."""
    if args.yes or not sys.stdin.isatty():
        return True
    for name, dataset in datasets_of(config, args.dataset).items():
        plan = plan_dataset(name, dataset, force=args.force, keys=keys[name], limit=args.limit)
        print("\n".join(plan.lines()))
    return input("Continue? (yes/no): ").strip().lower() in ("y", "yes")


def cmd_search(config: BackfillConfig, args: argparse.Namespace) -> int:
    """The rows nearest a query, by the dataset's own embedding model: do the vectors find what you mean?"""
    from .search import embed_query, nearest

    name, dataset = next(iter(datasets_of(config, args.dataset).items()))
    env = dataset.embedding.resolved_api_key_env
    vector = embed_query(dataset, args.query, os.environ.get(env) if env else None)
    with open_store(name, dataset) as store:
        store.check_schema()
        hits = nearest(store, dataset, vector, args.k)
    rows: list[list[object]] = [[n, h.row_id, f"{h.similarity:.3f}", h.text] for n, h in enumerate(hits, 1)]
    print(
        f"{name}: the {len(hits)} rows nearest {args.query!r} ({dataset.embedding.provider} {dataset.embedding.model})"
    )
    print_table(["#", "id", "similarity", "text"], rows)
    return 0


def cmd_failures(config: BackfillConfig, args: argparse.Namespace) -> int:
    """Recorded failures, newest first, a page at a time (``--limit``, ``--offset``), with the total."""
    pages: dict[str, dict] = {}
    for name, dataset in datasets_of(config, args.dataset).items():
        with open_store(name, dataset) as store:
            store.check_schema()
            found = store.ledger.failures(args.limit, args.offset)
            pages[name] = {"total": store.ledger.failure_count(), "offset": args.offset, "failures": found}
    if args.json:
        print(json.dumps(pages, default=str, indent=2))
        return 0
    rows = [
        [name, f["row_id"], f["stage"], f["error_class"], f["attempts"], f["last_failed_at"],
         "yes" if f["requeued"] else "no", f["message"][:80]]
        for name, page in pages.items() for f in page["failures"]
    ]  # fmt: skip
    if rows:
        print_table(["dataset", "row id", "stage", "class", "attempts", "last failed", "requeued", "message"], rows)
    for name, page in pages.items():
        if not page["total"]:
            print(f"{name}: no failures recorded")
            continue
        shown = len(page["failures"])
        more = page["total"] - args.offset - shown
        print(f"{name}: {page['total']} failures recorded; showing {shown} from {args.offset}"
              + (f" ({more} more: --offset {args.offset + shown})" if more > 0 else ""))  # fmt: skip
    return 0


def cmd_requeue(config: BackfillConfig, args: argparse.Namespace) -> int:
    for name, dataset in datasets_of(config, args.dataset).items():
        with open_store(name, dataset) as store:
            n = store.ledger.requeue_failures(args.ids or None)
        print(f"{name}: {n} failed rows re-queued; the next run of their partition retries them")
    return 0


def set_pool_limits(instance, limits: dict[str, int]) -> None:
    """Explicit limits for the provider-calling pools (never ``default_limit``: dagster-io/dagster#33552)."""
    for pool, limit in limits.items():
        instance.event_log_storage.set_concurrency_slots(pool, limit)


def cmd_pools(config: BackfillConfig, args: argparse.Namespace) -> int:
    """Show the pools' limits; with ``--embedding``/``--llm``, set them first."""
    from .lib.assets import EMBEDDING_POOL, ENRICHMENT_POOL

    instance = cli_instance()
    wanted = {EMBEDDING_POOL: args.embedding, ENRICHMENT_POOL: args.llm}
    set_pool_limits(instance, {pool: limit for pool, limit in wanted.items() if limit is not None})
    for pool in (EMBEDDING_POOL, ENRICHMENT_POOL):
        info = instance.event_log_storage.get_concurrency_info(pool)
        limit = info.slot_count if info.slot_count else "not set (steps of this pool run without a limit)"
        print(f"pool {pool}: limit {limit}")
    return 0


def cmd_demo(config: BackfillConfig, args: argparse.Namespace) -> int:
    from .demo_data import create_demo_database

    name = "jobs"
    dataset = config.datasets.get(name)
    if dataset is None or not dataset.database_url_value().startswith("sqlite"):
        raise ConfigError("`demo` runs on the built-in demo config (or one like it, with a SQLite `jobs` dataset)")
    path = sqlite_path(dataset.database_url_value())
    if args.fresh or not path.exists():
        create_demo_database(path, rows=args.rows, seed=args.seed, embedding=dataset.embedding)
        print(f"created demo database {path}: {args.rows} job postings (seed {args.seed})")
    with open_store(name, dataset) as store:
        added = store.migrate()
    if added:
        print(f"migrated: added {', '.join(added)}")
    print(f"Dagster instance: {cli_instance().root_directory}")
    keys = register_all(config, name)[name]
    print("\ncoverage before:")
    print_table(
        COVERAGE_HEADERS,
        coverage_rows(name, dataset, by_partition=False),
    )
    from .cli_materialize import materialize_partitions

    print(f"\nmaterializing {len(keys)} partitions of the whole graph:")
    started = time.monotonic()
    ok = materialize_partitions(args.config or str(demo_config_path()), name, keys)
    seconds = time.monotonic() - started
    print("\ncoverage after:")
    rows = coverage_rows(name, dataset, by_partition=False)
    print_table(COVERAGE_HEADERS, rows)
    total_rows = int(str(rows[-1][2]))
    print(
        f"\n{total_rows} rows through the graph in {seconds:.1f}s ({int(total_rows) / seconds:.0f} rows/s, "
        "including Dagster's per-run start-up)"
    )
    print("next: `make dev` (or `dagster dev -w workspace.yaml`) to browse the runs and the asset graph")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backfill-pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="config file (default: $BACKFILL_CONFIG; `demo` uses the built-in demo)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help: str, dataset: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        if dataset:
            p.add_argument("--dataset", help="only this dataset (default: all)")
        return p

    p = add("demo", cmd_demo, "create the demo database and run the whole graph on every partition", False)
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--fresh", action="store_true", help="recreate the demo database first")
    p = add("create-demo-db", cmd_create_demo_db, "create the demo SQLite database", False)
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--path", help="file to create (default: the demo config's database)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    add("register", cmd_register, "register the partitions that hold rows in the Dagster instance")
    p = add("coverage", cmd_coverage, "show coverage per dataset (and partition)")
    p.add_argument("--by-partition", action="store_true")
    p.add_argument("--json", action="store_true", help="as JSON, every partition and the totals")
    p.add_argument("--exact", action="store_true", help=EXACT)
    p = add("status", cmd_status, "JSON for scripts: coverage by partition, rows by reason, failures by class")
    p.add_argument("--exact", action="store_true", help=EXACT)
    add("migrate", cmd_migrate, "add missing result columns, results table and failures table")
    p = add("plan", cmd_plan, "dry run: rows needing work by reason, tokens, requests, cost, minutes")
    p.add_argument("--force", action="store_true", help="plan a full re-embed")
    p.add_argument("--json", action="store_true", help="the plan as JSON, one object per dataset")
    p.add_argument("--partition", action="append", help="only this partition key (repeatable)")
    p.add_argument("--limit", type=int, help="plan at most this many rows of work, partitions in order")
    p.add_argument("--exact", action="store_true", help=EXACT)
    p = add("materialize", cmd_materialize, "run the graph for registered partitions in this process")
    p.add_argument(
        "--partition",
        action="append",
        help="partition key, or an archive value as stored (repeatable; default: every partition holding rows)",
    )
    p.add_argument("--partition-of", action="append", metavar="ID", help="the partition holding this row id")
    p.add_argument("--force", action="store_true", help="redo every row")
    p.add_argument("--limit", type=int, help="at most this many rows of work in the whole run (partitions in order)")
    p.add_argument("--parallel", type=int, default=1, help="partitions run at once, each in its own process")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation at a terminal")
    p.add_argument("--json", action="store_true", help="the summary as one JSON document on stdout")
    p.add_argument(
        "--no-head-start",
        action="store_true",
        help="send nothing before the first run's step (by default the first requests leave while Dagster starts)",
    )
    p = add("pools", cmd_pools, "show (or set) the concurrency limits of the provider-calling pools", False)
    p.add_argument("--embedding", type=int, help="set: embedding steps running at once, over all runs")
    p.add_argument("--llm", type=int, help="set: enrichment steps running at once, over all runs")
    p = add("search", cmd_search, "the rows nearest a query, embedded by the dataset's own model")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=10, help="how many rows (default 10)")
    p = add("failures", cmd_failures, "list recorded failures with their error, newest first")
    p.add_argument("--limit", type=int, default=50, help="rows per page (default 50)")
    p.add_argument("--offset", type=int, default=0, help="skip this many (the next page)")
    p.add_argument("--json", action="store_true", help="one JSON document, with the total per dataset")
    p = add("requeue", cmd_requeue, "make failed rows eligible for the next run at once")
    p.add_argument("--ids", nargs="*", help="only these row ids")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Errors end in one line that says what is wrong (and exit 2); ``--debug`` shows the traceback."""
    args = build_parser().parse_args(argv)
    # Dagster's SQLite storage stamps each new run's event log with alembic, which logs at INFO: not news
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        demo = args.fn in (cmd_demo, cmd_create_demo_db)
        config = load_config(args.config or (demo_config_path() if demo else None))
        return args.fn(config, args)
    except BrokenPipeError:  # `plan | head`: the reader has what it wanted
        sys.stderr.close()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return stopping.EXIT_AT_ONCE
    except Exception as exc:
        if args.debug:
            raise
        known = isinstance(exc, ConfigError | StoreError)
        print(f"error: {mask_secrets(str(exc) if known else f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
        if not known:
            print("(run with --debug for the traceback)", file=sys.stderr)
        return 2


def run() -> NoReturn:
    """The console script: :func:`main`, then an exit that skips tearing down the interpreter's thousands
    of modules one by one (0.4 s after every command, each partition's run already recorded). The exit
    handlers still run and the streams are flushed; an exception still ends the ordinary way."""
    status = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`plan | head`)
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    run()
