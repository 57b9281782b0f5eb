"""``materialize --parallel`` starts its runs a few at a time: the next run begins when one reaches its provider
calls, so the first partitions' first requests are not delayed by the start-up of all the others. Paced by a
rate budget, a place per two cores; unpaced, a place per core."""

from __future__ import annotations

import io
from pathlib import Path

import dagster as dg
import pytest

from backfill_pipeline import start_gate
from backfill_pipeline.cli_materialize import materialize_partitions
from backfill_pipeline.cli_runs import cli_instance
from backfill_pipeline.config import load_config
from backfill_pipeline.demo_data import create_demo_database
from backfill_pipeline.partitions import range_key, register_partitions
from backfill_pipeline.stores import open_store

from .conftest import demo_config_dict, write_config


def _step_starts(instance: dg.DagsterInstance) -> list[dict[str, float]]:
    """Per run, when each of its steps started (by the step's asset name)."""
    starts = []
    for run in instance.get_runs():
        events = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
        starts.append({(e.step_key or "").split("__")[-1]: e.timestamp for e in events})
    return sorted(starts, key=lambda s: s["raw_rows"])


def _materialize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cores: int, paced: bool) -> list[dict[str, float]]:
    db = create_demo_database(tmp_path / "demo.sqlite", rows=200, seed=3)
    data = demo_config_dict(db, width=50)
    if paced:  # a budget far above what the offline provider asks: it paces nothing, but it is configured
        data["datasets"]["jobs"]["embedding"]["rate_limit"] = {"requests_per_minute": 1_000_000}
    config = write_config(tmp_path, data)
    assert start_gate.paced(load_config(config).datasets["jobs"]) is paced
    with open_store("jobs", load_config(config).datasets["jobs"]) as store:
        store.migrate()
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(start_gate.os, "cpu_count", lambda: cores)
    keys = [range_key(b, 50) for b in range(4)]
    register_partitions(cli_instance(), "jobs", keys)
    assert materialize_partitions(str(config), "jobs", keys, parallel=2, out=io.StringIO())
    return _step_starts(cli_instance())


# `instance` (conftest): a live test instance keeps Dagster's current defs-state storage valid while the job
# definitions load, whatever instance an earlier test left behind
def test_on_two_cores_each_run_starts_once_another_reached_its_provider_calls(tmp_path, monkeypatch, instance) -> None:
    runs = _materialize(tmp_path, monkeypatch, cores=2, paced=True)  # one place
    assert len(runs) == 4
    for later in runs[1:]:
        reached = [r["llm_enrichment"] for r in runs if r is not later]
        assert min(reached) <= later["raw_rows"]  # it waited at the gate for one of the others


def test_unpaced_two_workers_start_together(tmp_path, monkeypatch, instance) -> None:
    """The control: unpaced, a place per core; the second run reads while the first has not reached its calls."""
    runs = _materialize(tmp_path, monkeypatch, cores=2, paced=False)  # two places
    assert runs[1]["raw_rows"] < runs[0]["llm_enrichment"]


def test_which_datasets_are_paced(tmp_path) -> None:
    """A provider's own service always has limits (learned from its headers); a server of one's own is
    paced only by limits configured for it; batch mode never is."""
    db = create_demo_database(tmp_path / "demo.sqlite", rows=10, seed=3)

    def paced(embedding: dict, enrichment: dict | None = None) -> bool:
        data = demo_config_dict(db, width=50)
        data["datasets"]["jobs"]["embedding"] = {"dimension": 768, **embedding}
        data["datasets"]["jobs"]["enrichment"] = enrichment or {"enabled": False}
        return start_gate.paced(load_config(write_config(tmp_path, data)).datasets["jobs"])

    own = {"provider": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}
    assert paced({"provider": "openai", "model": "text-embedding-3-small"})
    assert not paced(own)
    assert paced({**own, "rate_limit": {"tokens_per_minute": 1000}})
    assert not paced({"provider": "openai", "model": "text-embedding-3-small", "mode": "batch"})
    assert paced(own, {"enabled": True, "provider": "gemini", "model": "gemini-2.0-flash"})
    assert not paced(own, {"enabled": False, "provider": "gemini", "model": "gemini-2.0-flash"})
