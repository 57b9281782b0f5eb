"""The CLI's Dagster instance, the runs it starts, and those whose process died: marked failed.

A run executed in the CLI's own process (``execute_in_process``) has no run monitoring to notice a
``kill -9`` or a lost terminal: it would stay STARTED in the instance, and in the UI, for ever. Each such
run carries the host and process id that ran it, and the next command that runs partitions marks the
runs of processes that are gone as failed, saying why.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

import dagster as dg

LAUNCHED_BY = "backfill/launched_by"
HOST = "backfill/host"
PID = "backfill/pid"
CLI = "backfill-pipeline"
UNFINISHED = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def dagster_home() -> Path:
    """$DAGSTER_HOME, or ./.dagster_home (created, with a local dagster.yaml) when it is unset."""
    if not os.environ.get("DAGSTER_HOME"):
        home = Path(".dagster_home").resolve()
        home.mkdir(exist_ok=True)
        os.environ["DAGSTER_HOME"] = str(home)
    settings = Path(os.environ["DAGSTER_HOME"]) / "dagster.yaml"
    if not settings.exists():
        settings.write_text(
            "# local instance: metadata in SQLite files beside this one\ntelemetry:\n  enabled: false\n"
        )
    return settings.parent


def cli_instance() -> dg.DagsterInstance:
    """The Dagster instance of :func:`dagster_home` (one per home: a process may run commands for several)."""
    return _instance_of(str(dagster_home()))


@functools.cache
def _instance_of(home: str) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(home)


def cli_run_tags() -> dict[str, str]:
    """Tags for a run this process executes."""
    return {LAUNCHED_BY: CLI, HOST: socket.gethostname(), PID: str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def fail_dead_cli_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed the unfinished runs that a CLI process on this host started and that process is gone."""
    host = socket.gethostname()
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED, tags={LAUNCHED_BY: CLI, HOST: host}))
    failed = []
    for run in runs:
        pid = run.tags.get(PID, "")
        if pid.isdigit() and not _alive(int(pid)):
            instance.report_run_failed(
                run, f"the backfill-pipeline process (pid {pid} on {host}) that ran this run is gone (killed?)"
            )
            failed.append(run.run_id)
    return failed
