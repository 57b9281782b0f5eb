"""`backfill-pipeline search`: the rows nearest a query by the dataset's own model, ranked by numpy on
SQLite and by pgvector's distance operator on Postgres, after a real run of the semantic local embedder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import yaml

from backfill_pipeline.cli import main
from backfill_pipeline.config import load_config
from backfill_pipeline.search import embed_query
from backfill_pipeline.stores import open_store

from .conftest import REPO, subprocess_env
from .test_postgres_scenarios import posting

QUERIES = {
    "hiring people": "Recruiter",
    "looking after customers": "Customer Support",
    "machine learning models": "Machine Learning",
}


def _run(config: Path, home: Path, *args: str) -> str:
    """The CLI as users run it, in a process of its own (with a Dagster home of this test's)."""
    cli = str(Path(sys.executable).parent / "backfill-pipeline")
    env = subprocess_env(DAGSTER_HOME=str(home), SEARCH_DB_URL=os.environ.get("SEARCH_DB_URL", ""))
    done = subprocess.run([cli, "--config", str(config), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    return done.stdout


def _titles(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(r"^\d+ ", line)]


def test_search_on_sqlite_finds_postings_by_meaning(demo_db: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    data = yaml.safe_load((REPO / "backfill_pipeline" / "config" / "demo_config.yaml").read_text())
    jobs = data["datasets"]["jobs"]
    jobs.update(database_url=f"sqlite:///{demo_db}", embedding={"provider": "local", "dimension": 256})
    jobs["partitioning"]["width"] = 10_000
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    for command in (["migrate"], ["register"], ["materialize", "--yes"]):
        _run(config, tmp_path, *command)
    found = {}
    for query, role in QUERIES.items():  # no query shares a word with the role it should find
        hits = _titles(_run(config, tmp_path, "search", query, "-k", "5"))
        assert len(hits) == 5 and any(role in hit for hit in hits[:2]), (query, hits)
        found[query] = sum(role in hit for hit in hits)
    assert sum(found.values()) >= 10, found  # two thirds of the top five are the role meant


def test_search_on_postgres_is_ranked_by_pgvector(pgvector_db: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with psycopg.connect(pgvector_db, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE jobs (id bigint PRIMARY KEY, title text, company text, description text, "
            "embedding vector(256))"
        )
        conn.cursor().executemany(
            "INSERT INTO jobs (id, title, company, description) VALUES (%s, %s, %s, %s)",
            [(i, *posting(i)) for i in range(1, 121)],
        )
    dataset = {
        "database_url": {"env": "SEARCH_DB_URL"},
        "table": "jobs",
        "text": {"template": "{title} at {company}\n\n{description}"},
        "embedding": {"provider": "local", "dimension": 256},
        "partitioning": {"width": 1000},
    }
    monkeypatch.setenv("SEARCH_DB_URL", pgvector_db)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"datasets": {"jobs": dataset}}))
    for command in (["migrate"], ["register"], ["materialize", "--yes"]):
        _run(config, tmp_path, *command)
    loaded = load_config(config).datasets["jobs"]
    with open_store("jobs", loaded) as store:
        ranked = store.rows.nearest(embed_query(loaded, "online marketing and social media", None), 5)
    assert ranked is not None and len(ranked) == 5  # the database ranked them
    hits = _titles(_run(config, tmp_path, "search", "online marketing and social media", "-k", "5"))
    assert [int(h.split()[1]) for h in hits] == [row_id for row_id, _ in ranked]
    assert sum("Marketing" in hit for hit in hits) >= 4, hits
    with pytest.raises(SystemExit):
        main(["--config", str(config), "search"])  # the query is required
