"""Ctrl+C and SIGTERM: stop sending, finish what is in flight, write it, release the partition, record the
run as canceled; a second Ctrl+C stops at once. Real CLI processes against the loopback provider server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from .conftest import query, subprocess_env
from .fake_providers import OPENAI_KEY, ModelLimits
from .graph_helpers import register
from .test_provider_graph import provider_config, setup

ENRICHED_HERE = "SELECT count(*) FROM job_postings WHERE enrichment_model = 'gpt-4o-mini'"
PENDING = "SELECT count(*) FROM job_postings WHERE description != '' AND summary IS NULL"


def _slow_dataset(
    demo_db,
    tmp_path,
    monkeypatch,
    server,
    width: int,
    latency: float = 0.05,
    **dataset: object,
) -> tuple[dict, dg.DagsterInstance, list[str]]:
    """Partitions of ``width`` rows, a chat model slow enough to stop mid-enrichment, and leases of two
    minutes, so a partition free at once afterwards shows the lease was released, not expired."""
    data = provider_config(demo_db, server)
    jobs = data["datasets"]["jobs"]
    jobs["partitioning"]["width"] = width
    jobs["enrichment"]["max_in_flight"] = 4
    jobs["lease_seconds"] = 120
    jobs.update(dataset)
    server.limits["gpt-4o-mini"] = ModelLimits(latency_seconds=latency)
    path, config = setup(tmp_path, data, monkeypatch)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = dg.DagsterInstance.get()
    keys = register(config, "jobs", instance)
    env = subprocess_env(BACKFILL_CONFIG=str(path), DAGSTER_HOME=str(home), OPENAI_API_KEY=OPENAI_KEY)
    return env, instance, keys


def _materialize(env: dict, *extra: str) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "backfill-pipeline"), "materialize", "--yes", *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_answers(server, n: int) -> None:
    deadline = time.time() + 120
    while server.count("chat", 200) < n and time.time() < deadline:
        time.sleep(0.01)


def _asked(server) -> int:
    return sum(n for (route, _), n in server.stats.texts_asked.items() if route == "chat")


def _no_retries_or_orphans(instance: dg.DagsterInstance) -> None:
    for record in instance.get_run_records():
        assert record.dagster_run.status != dg.DagsterRunStatus.NOT_STARTED
        retries = instance.get_records_for_run(
            record.dagster_run.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY
        ).records
        assert not retries, "an interrupt must not become a retry"


def test_ctrl_c_writes_what_was_paid_for_and_cancels_the_run(demo_db, tmp_path, monkeypatch, server) -> None:
    env, instance, [key] = _slow_dataset(demo_db, tmp_path, monkeypatch, server, width=1000)
    proc = _materialize(env)
    _wait_for_answers(server, 40)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err[-3000:]
    assert "Traceback" not in out + err
    assert f"{key}: STOPPED" in out and "stopped by Ctrl+C" in out
    written = int(re.search(r"STOPPED .*?, (\d+) rows written", out).group(1))
    assert written > 0 and query(demo_db, ENRICHED_HERE)[0][0] == written, out + err  # the answers paid for are written
    assert query(demo_db, PENDING)[0][0] > 0  # ... and the rest was not sent
    [run] = instance.get_run_records()
    assert run.dagster_run.status == dg.DagsterRunStatus.CANCELED
    _no_retries_or_orphans(instance)

    # The lease was released (it would last two minutes otherwise); nothing answered is paid for again.
    again = _materialize(env)
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, out + err[-3000:]
    assert f"{key}: ok," in out
    assert server.repeated_texts("chat") == 0
    assert query(demo_db, PENDING)[0][0] == 0


def test_ctrl_c_between_windows_writes_the_finished_windows(demo_db, tmp_path, monkeypatch, server) -> None:
    """A partition streamed in windows of 100 rows, stopped in its second window: the first window and what the
    second was paid for are written, the windows not yet begun are not sent, and the next run pays for none twice."""
    env, instance, [key] = _slow_dataset(demo_db, tmp_path, monkeypatch, server, width=1000, rows_in_memory=100)
    proc = _materialize(env)
    _wait_for_answers(server, 130)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and f"{key}: STOPPED" in out, out + err[-3000:]
    written = int(re.search(r"STOPPED .*?, (\d+) rows written", out).group(1))
    assert 130 <= written < 200 and query(demo_db, ENRICHED_HERE)[0][0] == written, out  # window 1, part of 2
    assert _asked(server) <= 200  # nothing of the third window was sent
    assert query(demo_db, PENDING)[0][0] > 0
    _no_retries_or_orphans(instance)

    again = _materialize(env)
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0 and f"{key}: ok," in out, out + err[-3000:]
    assert server.repeated_texts("chat") == 0 and query(demo_db, PENDING)[0][0] == 0


def test_sigterm_stops_parallel_workers_and_a_second_one_stops_at_once(demo_db, tmp_path, monkeypatch, server) -> None:
    env, instance, keys = _slow_dataset(demo_db, tmp_path, monkeypatch, server, width=60, latency=0.2)
    assert len(keys) >= 4
    proc = _materialize(env, "--parallel", "2")
    _wait_for_answers(server, 16)
    proc.send_signal(signal.SIGTERM)  # to the CLI alone: it tells its workers
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err[-3000:]
    assert out.count(": STOPPED") == 2 and out.count("NOT STARTED") == len(keys) - 2, out
    runs = instance.get_run_records()
    assert len(runs) == 2 and {r.dagster_run.status for r in runs} == {dg.DagsterRunStatus.CANCELED}
    _no_retries_or_orphans(instance)

    # A second signal does not wait for the requests in flight.
    server.limits["gpt-4o-mini"] = ModelLimits(latency_seconds=5.0)
    asked = _asked(server)
    proc = _materialize(env)
    deadline = time.time() + 120
    while _asked(server) < asked + 4 and time.time() < deadline:  # requests are in flight, for 5 s each
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 4.0 and proc.returncode == 130
    assert "stopped at once" in err and "Traceback" not in err
    server.limits["gpt-4o-mini"] = ModelLimits(latency_seconds=0.0)
    again = _materialize(env)
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, out + err[-3000:]
    assert query(demo_db, PENDING)[0][0] == 0
    assert os.path.exists(demo_db)
