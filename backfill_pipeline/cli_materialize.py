"""Running a dataset's job for partitions from the CLI: in this process, or in forked workers that stop
gracefully with the CLI (see :mod:`backfill_pipeline.stopping`)."""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TextIO

import pyarrow as pa

from . import start_gate, stopping
from .cli_progress import partition_progress
from .cli_runs import cli_instance, cli_run_tags, dagster_home
from .config import load_config
from .providers import warm_up
from .run_summary import RunSummary, failed_rows, partition_figures


def _run_config(name: str, force: bool, limit: int | None) -> dict:
    detection: dict[str, object] = {"force": force}
    if limit:
        detection["limit"] = limit
    return {
        "ops": {f"{name}__detected_placeholders": {"config": detection}},
        # the full event log is in the instance (and the UI); the terminal gets warnings and a line per run
        "loggers": {"console": {"config": {"log_level": os.environ.get("BACKFILL_LOG_LEVEL", "WARNING")}}},
    }


def _run_partition(config_path: str | None, name: str, key: str, force: bool, limit: int | None) -> tuple:
    """One partition's run in this process: (key, status, rows written, seconds, run id, figures), where the
    status is "ok", "FAILED", "SKIPPED (held by run …)" when another live run holds the partition, "STOPPED"
    when a graceful stop ended it, or "NOT STARTED" when the stop came first; figures for the summary."""
    started = time.monotonic()
    if stopping.requested():
        return key, STATUS_NOT_STARTED, 0, 0.0, "", {}
    written_before = stopping.written()
    job = _job_cache(config_path, name)
    start_gate.enter()
    if stopping.requested():  # while it waited for a place
        start_gate.started()
        return key, STATUS_NOT_STARTED, 0, 0.0, "", {}
    try:
        result = job.execute_in_process(
            partition_key=key,
            instance=cli_instance(),
            run_config=_run_config(name, force, limit),
            tags=cli_run_tags(),
            raise_on_error=False,
        )
    finally:
        start_gate.started()
    written, status = 0, "ok" if result.success else "FAILED"
    metadata: dict[str, dict[str, object]] = {}
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        metadata[mat.asset_key.path[-1]] = {k: v.value for k, v in mat.metadata.items()}
        if mat.asset_key.path[-1] == "written_table":
            written = mat.metadata["rows_written"].value
        held = mat.metadata.get("held_by_run")
        if held is not None and result.success:
            status = f"SKIPPED (held by run {str(held.value)[:8]}, which is still working on it)"
    if not result.success and not stopping.requested() and _interrupted(result):
        stopping.interrupted("an interrupt")  # between steps Dagster's handler had the signal: stop the others too
    if not result.success and stopping.requested():
        status, written = STATUS_STOPPED, stopping.written() - written_before
    return key, status, written, time.monotonic() - started, result.run_id, partition_figures(metadata)


def _interrupted(result: object) -> bool:
    """Whether Dagster ended the run for a SIGINT or SIGTERM that came between its steps (within a step the
    graceful stop has the signal)."""
    for event in getattr(result, "all_events", []):
        error = getattr(event.event_specific_data, "error", None)
        if error is not None and error.cls_name == "DagsterExecutionInterruptedError":
            return True
    return False


STATUS_STOPPED = "STOPPED (completed rows written, the rest left for the next run)"
STATUS_NOT_STARTED = "NOT STARTED (stop requested)"


def _worker_started(gate: object) -> None:
    """A forked worker of ``--parallel``: a signal asks for a graceful stop, a second ends it at once; its
    runs start through the shared :mod:`start gate <backfill_pipeline.start_gate>`."""
    stopping.install_for_process()
    start_gate.install(gate)


def _kill_workers() -> None:
    for child in multiprocessing.active_children():
        child.kill()


@functools.cache
def _job_cache(config_path: str | None, name: str):  # noqa: ANN202 - a JobDefinition
    from .lib import backfill_definitions, job_name

    return backfill_definitions(load_config(config_path)).resolve_job_def(job_name(name))


def materialize_partitions(
    config_path: str | None,
    name: str,
    keys: list[str],
    *,
    force: bool = False,
    limits: dict[str, int] | None = None,
    parallel: int = 1,
    summary: RunSummary | None = None,
    out: TextIO | None = None,
) -> bool:
    """Run the dataset's job for each partition key, a line per partition on ``out`` (stdout) and its
    figures added to ``summary``; True when every run succeeded.

    With ``parallel`` > 1, that many worker processes take partitions from a shared queue, as a
    partition backfill's runs would; the rate budget and partition leases hold across them.
    """
    ok = True
    results: Iterable[tuple]
    if parallel <= 1:
        results = (_run_partition(config_path, name, k, force, (limits or {}).get(k)) for k in keys)
    else:
        dagster_home()  # for the workers; each opens its own instance after the fork
        # built once here, inherited by the forked workers instead of being built again by each of them
        _job_cache(config_path, name)
        dataset = load_config(config_path).datasets[name]
        warm_up(dataset.embedding)
        warm_up(dataset.enrichment)
        pa.array([0])  # pyarrow loads pandas with its first array of Python values: 0.23 s of CPU a worker
        # fork where available: the workers start with Dagster already imported (seconds saved per worker)
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = ProcessPoolExecutor(
            max_workers=parallel,
            mp_context=context,
            initializer=_worker_started,
            initargs=(start_gate.make(context, start_gate.paced(dataset)),),
        )
        futures = [pool.submit(_run_partition, config_path, name, k, force, (limits or {}).get(k)) for k in keys]
        results = (f.result() for f in as_completed(futures))
    try:
        with (
            stopping.graceful_signals(at_once=_kill_workers if parallel > 1 else None),
            partition_progress(name, len(keys), out or sys.stdout) as report,
        ):
            for n, (key, status, written, seconds, run_id, figures) in enumerate(results, 1):
                line = f"  [{n}/{len(keys)}] {name} {key}: {status}"
                if status != STATUS_NOT_STARTED:
                    failed = failed_rows(figures)
                    line += f", {written} rows written" + (f", {failed} failed" if failed else "")
                    line += f" in {seconds:.1f}s (run {run_id[:8]})"
                report(line, figures)
                ok &= status == "ok"
                if summary is not None:
                    summary.add(status, figures)
    finally:
        if parallel > 1:
            pool.shutdown()
    return ok
