"""The head start: ``materialize`` sends its first requests while Dagster starts, and the runs take the
answers from the cache. Real CLI processes against the loopback provider server, the database URL given
as ``{env: VAR}`` as users write it."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

from backfill_pipeline import head_start
from backfill_pipeline.config import load_config

from .conftest import query, subprocess_env
from .fake_providers import ModelLimits
from .test_graceful_stop import PENDING, _asked, _materialize, _slow_dataset


def _env_url(tmp_path, demo_db, monkeypatch, server, **dataset):
    monkeypatch.setenv("HEAD_START_DB", f"sqlite:///{demo_db}")
    env, instance, keys = _slow_dataset(
        demo_db, tmp_path, monkeypatch, server, width=1000, database_url={"env": "HEAD_START_DB"}, **dataset
    )
    return {**env, "HEAD_START_DB": f"sqlite:///{demo_db}"}, instance, keys


def test_the_first_requests_leave_before_the_run_and_nothing_is_paid_twice(
    demo_db, tmp_path, monkeypatch, server
) -> None:
    env, _, [key] = _env_url(tmp_path, demo_db, monkeypatch, server, latency=0.1)
    proc = _materialize(env, "--json")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out + err[-3000:]
    summary = json.loads(out)
    line = next(x for x in err.splitlines() if x.startswith("head start: "))
    paid_ahead = int(line.split()[2])
    assert paid_ahead > 0, line  # it sent before the run's enrichment step began
    assert "embeddings sent alongside" in line  # the embedded text leaves the enrichment out: both go ahead
    # every text paid once, by the head start or by the run; the summary counts each request once
    assert server.repeated_texts("chat") == 0 and server.repeated_texts("embeddings") == 0
    assert summary["enrichment_requests"] == server.count("chat", 200)
    assert summary["embedding_requests"] == server.count("embeddings", 200)
    assert summary["enrichment_cache_hits"] == paid_ahead  # the run took each of its answers from the cache
    assert summary["rows_written"] == query(demo_db, "SELECT count(*) FROM job_postings WHERE description != ''")[0][0]
    assert query(demo_db, PENDING)[0][0] == 0


def test_without_a_head_start_nothing_leaves_before_the_run(demo_db, tmp_path, monkeypatch, server) -> None:
    env, _, [key] = _env_url(tmp_path, demo_db, monkeypatch, server)
    proc = _materialize(env, "--no-head-start")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0 and f"{key}: ok" in out, out + err[-3000:]
    assert "head start" not in out + err
    assert server.repeated_texts("chat") == 0


def test_the_cli_forks_it_before_importing_dagster() -> None:
    code = (
        "import sys, backfill_pipeline.cli, backfill_pipeline\n"
        "print('dagster' in sys.modules)\n"
        "print(backfill_pipeline.EmbeddingBackfill.__name__, 'EmbeddingBackfill' in dir(backfill_pipeline))\n"
        "print('dagster' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), check=True)
    assert out.stdout.split() == ["False", "EmbeddingBackfill", "True", "True"]


def test_unconfirmed_it_pays_nothing_and_ends(demo_db, tmp_path, monkeypatch, server) -> None:
    """The operator answered no (or the partitions could not be settled): it never sends."""
    _env_url(tmp_path, demo_db, monkeypatch, server)
    config = load_config(os.environ["BACKFILL_CONFIG"])
    started = head_start.begin(config, "jobs")
    assert started is not None
    time.sleep(1.5)  # ready, waiting for the go
    report = io.StringIO()
    assert started.finish(report) == {}
    assert not started.process.is_alive() and report.getvalue() == ""
    assert server.count("chat") == 0 and server.count("embeddings") == 0


def test_it_is_left_out_where_it_cannot_help(demo_db, tmp_path, monkeypatch, server) -> None:
    _env_url(tmp_path, demo_db, monkeypatch, server)
    config = load_config(os.environ["BACKFILL_CONFIG"])
    jobs = config.datasets["jobs"]
    assert head_start.why_not(jobs) is None
    assert head_start.begin(config, "jobs", enabled=False) is None
    no_cache = jobs.model_copy(update={"cache": jobs.cache.model_copy(update={"backend": "none"})})
    assert "cache" in str(head_start.why_not(no_cache))
    batch = jobs.model_copy(update={"enrichment": jobs.enrichment.model_copy(update={"mode": "batch"})})
    assert "batch" in str(head_start.why_not(batch))


def test_a_killed_cli_leaves_no_head_start_sending_and_loses_no_answer(demo_db, tmp_path, monkeypatch, server) -> None:
    """kill -9 of the CLI while its head start has requests in flight: those are answered and cached, it
    sends nothing more, and the next command pays for none of them again."""
    env, _, [key] = _env_url(tmp_path, demo_db, monkeypatch, server, latency=0.5)
    proc = _materialize(env)
    deadline = time.time() + 60
    while _asked(server) == 0 and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # the head start's first requests are in flight; Dagster's run is starting
    proc.communicate(timeout=30)
    time.sleep(2.0)  # its requests in flight are answered (0.5 s)
    asked = _asked(server)
    time.sleep(1.5)
    assert _asked(server) == asked, "the head start went on sending after the CLI died"
    assert server.count("chat", 200) > 0

    server.limits["gpt-4o-mini"] = ModelLimits(latency_seconds=0.01)
    again = _materialize(env)
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0 and f"{key}: ok" in out, out + err[-3000:]
    assert server.repeated_texts("chat") == 0  # what the head start was answered was cached, not paid again
    assert query(demo_db, PENDING)[0][0] == 0


def test_a_wrong_guess_pays_only_for_the_partitions_the_command_runs(demo_db, tmp_path, monkeypatch, server) -> None:
    """The head start reads the first partitions holding rows before the CLI has settled which it runs; when
    the first is not registered (so not run), it pays for none of its rows and reads the CLI's instead."""
    monkeypatch.setenv("HEAD_START_DB", f"sqlite:///{demo_db}")
    env, instance, keys = _slow_dataset(
        demo_db, tmp_path, monkeypatch, server, width=100, database_url={"env": "HEAD_START_DB"}
    )
    env["HEAD_START_DB"] = f"sqlite:///{demo_db}"
    assert len(keys) >= 3
    instance.delete_dynamic_partition("jobs_partitions", keys[0])  # guessed first, but not run
    proc = _materialize(env, "--json", "--force")  # every row with text needs work, the first partition's too
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out + err[-3000:]
    line = next(x for x in err.splitlines() if x.startswith("head start: "))
    assert int(line.split()[2]) > 0, line  # it paid, for the partitions the command runs
    first_hi = int(keys[0].split("-")[1])
    enriched = "SELECT count(*) FROM job_postings WHERE enrichment_model = 'gpt-4o-mini' AND id {} ?"
    assert query(demo_db, enriched.format("<="), (first_hi,))[0][0] == 0  # the unregistered partition: untouched
    run_rows = query(demo_db, enriched.format(">"), (first_hi,))[0][0]
    assert 0 < server.count("chat", 200) <= run_rows  # one request a text, for the rows run and no other
    assert server.repeated_texts("chat") == 0


def test_a_command_that_fails_before_its_runs_leaves_no_head_start_waiting(
    demo_db, tmp_path, monkeypatch, server, capsys
) -> None:
    """An unknown partition is one line and exit 2; the head start forked before it pays for nothing and ends
    at once, in a process that lives on (a notebook, a test), not after waiting ten minutes for its go."""
    import multiprocessing

    from backfill_pipeline.cli import main

    _env_url(tmp_path, demo_db, monkeypatch, server)
    assert main(["materialize", "--yes", "--partition", "no-such-partition"]) == 2
    assert "no partition 'no-such-partition'" in capsys.readouterr().err
    deadline = time.time() + 10
    while any(p.name == "head-start" for p in multiprocessing.active_children()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(p.name == "head-start" for p in multiprocessing.active_children())
    assert server.count("chat") == 0 and server.count("embeddings") == 0
