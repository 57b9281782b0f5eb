"""Shared fixtures: a small demo database in a temporary directory, its config, a Dagster instance."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import dagster as dg
import pytest
import yaml

from backfill_pipeline.config import load_config
from backfill_pipeline.demo_data import create_demo_database
from backfill_pipeline.stores import open_store

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def demo_config_dict(db_path: Path, width: int = 100) -> dict:
    """The built-in demo config, pointed at ``db_path`` with partitions of ``width`` ids."""
    base = yaml.safe_load((REPO / "backfill_pipeline" / "demo_config.yaml").read_text())
    jobs = base["datasets"]["jobs"]
    jobs["database_url"] = f"sqlite:///{db_path}"
    jobs["partitioning"]["width"] = width
    return base


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "backfill.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def demo_db(tmp_path: Path) -> Path:
    path = create_demo_database(tmp_path / "demo.sqlite", rows=300, seed=11)
    return path


@pytest.fixture
def demo_config_path(tmp_path: Path, demo_db: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = write_config(tmp_path, demo_config_dict(demo_db))
    monkeypatch.setenv("BACKFILL_CONFIG", str(path))
    config = load_config(path)
    with open_store("jobs", config.datasets["jobs"]) as store:
        store.migrate()
    return path


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(extra)
    return env
