"""Shared fixtures: a small demo database in a temporary directory, its config, a Dagster instance."""

from __future__ import annotations

import gc
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
    base = yaml.safe_load((REPO / "backfill_pipeline" / "config" / "demo_config.yaml").read_text())
    jobs = base["datasets"]["jobs"]
    jobs["database_url"] = f"sqlite:///{db_path}"
    jobs["partitioning"]["width"] = width
    # the hashing embedder, fastest, as the demo databases the tests make hold (the shipped demo is semantic)
    jobs["embedding"].update(provider="offline", model="offline-hash-v1", dimension=768)
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
    # An instance an earlier test left to the garbage collector resets Dagster's current defs-state storage
    # when it is collected, which can happen in the middle of this test and leave the storage of a disposed
    # instance current ("Attempted to resolve undefined DagsterInstance weakref"): collect them first.
    gc.collect()
    with dg.instance_for_test() as inst:
        yield inst


def query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: this one without pytest's and the project's own settings, plus ``extra``."""
    own = ("DAGSTER_HOME", "BACKFILL_CONFIG", "DAGSTER_POSTGRES_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k not in own}
    env.update(extra)
    return env


# -- Postgres ------------------------------------------------------------------------------------
from .pg import OwnedCluster, create_database, drop_database, local_server_url, unavailable  # noqa: E402


@pytest.fixture(scope="session")
def pg_server_url():
    """A Postgres server: the one on 127.0.0.1:5432, else an owned pgserver cluster."""
    url = local_server_url()
    if url:
        yield url
        return
    try:
        cluster = OwnedCluster()
    except Exception as exc:  # noqa: BLE001
        unavailable(f"no Postgres on 127.0.0.1:5432 and none could be started: {exc}")
    yield cluster.url()
    cluster.destroy()


@pytest.fixture(scope="session")
def pg_session_db(pg_server_url: str):
    """A fresh database for the test session, dropped after."""
    url = create_database(pg_server_url)
    yield url
    drop_database(pg_server_url, url)


@pytest.fixture(scope="session")
def pgvector_cluster():
    try:
        cluster = OwnedCluster()
    except pytest.skip.Exception:
        raise
    except Exception as exc:  # noqa: BLE001
        unavailable(f"could not start a pgvector Postgres from the pgserver wheel: {exc}")
    yield cluster
    cluster.destroy()


@pytest.fixture
def pgvector_db(pgvector_cluster: OwnedCluster):
    """A fresh pgvector-enabled database for one test."""
    url = create_database(pgvector_cluster.url(), extensions=("vector",))
    yield url
    drop_database(pgvector_cluster.url(), url)


@pytest.fixture
def pg_db(pg_session_db: str):
    """A fresh schema in the session database of the running Postgres (no pgvector there)."""
    import psycopg

    schema = f"t_{os.urandom(4).hex()}"
    with psycopg.connect(pg_session_db, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield pg_session_db, schema
    with psycopg.connect(pg_session_db, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def server():
    """The loopback provider server (OpenAI and Gemini wire formats), for one test."""
    from .fake_providers import FakeProviderServer

    srv = FakeProviderServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def production(tmp_path: Path, pg_server_url: str):
    """The README's production set-up: a DAGSTER_HOME with deploy/dagster.yaml (Dagster's storage in
    Postgres), a database for that storage and one for the data: (home, dagster db URL, data db URL)."""
    import shutil

    dagster_db = create_database(pg_server_url)
    data_db = create_database(pg_server_url)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    yield home, dagster_db, data_db
    drop_database(pg_server_url, dagster_db)
    drop_database(pg_server_url, data_db)
