"""Partition leases end with their holder: renewed while a step works, taken over once not renewed."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from backfill_pipeline.config import parse_config
from backfill_pipeline.leases import Lease, fresh_within
from backfill_pipeline.stores import open_store

from .conftest import demo_config_dict, subprocess_env, write_config


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request, tmp_path: Path):
    """A function opening a migrated store of a small table, on each backend."""
    return migrated_opener(request.param, request, tmp_path)


def migrated_opener(kind: str, request, tmp_path: Path):
    if kind == "sqlite":
        url, schema = f"sqlite:///{tmp_path / 'leases.sqlite'}", None
        import sqlite3

        sqlite3.connect(tmp_path / "leases.sqlite").execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
    else:
        url, schema = request.getfixturevalue("pg_db")
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE TABLE "{schema}".t (id bigint PRIMARY KEY, body text)')
    dataset = {"database_url": url, "table": "t", "text": {"columns": ["body"]}, "embedding": {"dimension": 4}}
    if schema:
        dataset["schema"] = schema
    config = parse_config({"datasets": {"t": dataset}}).datasets["t"]
    with open_store("t", config) as store:
        store.migrate()
    return lambda: open_store("t", config)


def _lease(opener, run_id: str, seconds: float) -> Lease:
    return Lease(opener, "0000000000-0000000099", run_id, fresh_within(seconds), seconds)


def test_a_lease_not_renewed_is_taken_over(opener) -> None:
    """A run killed after taking the lease (no renewal, never finished) holds it only for `seconds`."""
    with opener() as store:
        assert store.ledger.claim_partition("p", "killed-run", fresh_within(1.0)) is None
        assert store.ledger.claim_partition("p", "next-run", fresh_within(1.0)) == "killed-run"
        assert store.ledger.renew_lease("p", "killed-run")
        assert not store.ledger.renew_lease("p", "next-run")  # only the holder renews
        time.sleep(1.2)
        assert store.ledger.claim_partition("p", "next-run", fresh_within(1.0)) is None
        assert not store.ledger.renew_lease("p", "killed-run")  # it would learn it lost the lease
        held = store.ledger.lease_holder("p")
        assert held is not None and held[0] == "next-run" and held[1] < 1.0


def test_a_working_step_keeps_its_lease_beyond_its_lifetime(opener) -> None:
    worker = _lease(opener, "working-run", seconds=2.0)
    other = _lease(opener, "other-run", seconds=2.0)
    with worker.held() as holder:
        assert holder is None
        time.sleep(3.0)  # longer than the lease lasts: only the renewals keep it
        with other.held() as other_holder:
            assert other_holder == "working-run"
    worker.release()
    with other.held() as other_holder:
        assert other_holder is None
    other.release()


def test_a_finished_holder_is_not_waited_for(opener) -> None:
    with opener() as store:
        assert store.ledger.claim_partition("p", "done-run", fresh_within(60)) is None
        finished = fresh_within(60, finished=lambda run_id: run_id == "done-run")
        assert store.ledger.claim_partition("p", "next-run", finished) is None


def test_cli_reports_a_partition_held_by_a_live_run_as_skipped(demo_db: Path, tmp_path: Path) -> None:
    data = demo_config_dict(demo_db)
    data["datasets"]["jobs"]["lease_seconds"] = 600
    path = write_config(tmp_path, data)
    (tmp_path / "home").mkdir()
    env = subprocess_env(BACKFILL_CONFIG=str(path), DAGSTER_HOME=str(tmp_path / "home"))
    cli = str(Path(sys.executable).parent / "backfill-pipeline")
    subprocess.run([cli, "migrate"], env=env, check=True, capture_output=True)
    subprocess.run([cli, "register"], env=env, check=True, capture_output=True)
    holder = str(uuid.uuid4())
    config = parse_config(data).datasets["jobs"]
    with open_store("jobs", config) as store:
        assert store.ledger.claim_partition("0000000100-0000000199", holder, fresh_within(600)) is None
    done = subprocess.run(
        [cli, "materialize", "--partition", "0000000100-0000000199", "--yes"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"SKIPPED (held by run {holder[:8]}" in done.stdout
    assert ": ok," not in done.stdout


def test_live_leases_of_earlier_partitions_give_a_runs_rank(opener) -> None:
    """The rank that orders runs on a shared budget: live leases of partitions before this one."""
    with opener() as store:
        for key, run_id in [("p1", "a"), ("p2", "b"), ("p4", "d")]:
            assert store.ledger.claim_partition(key, run_id, fresh_within(60)) is None
        assert store.ledger.live_leases_before("p1", 60) == 0
        assert store.ledger.live_leases_before("p3", 60) == 2
        store.ledger.release_partition("p1", "a")  # finished: no longer ahead of anyone
        assert store.ledger.live_leases_before("p3", 60) == 1
        time.sleep(1.2)
        store.ledger.renew_lease("p4", "d")
        assert store.ledger.live_leases_before("p9", 1.0) == 1  # p2's holder stopped renewing: not live
