"""The backfill as a component: dropped into a user's own dg project, and run the way production runs it
(a database URL held in an environment variable, read by the sensor, schedule and check at tick time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
import yaml

from backfill_pipeline.config import ConfigError, parse_config
from backfill_pipeline.demo_data import create_demo_database
from backfill_pipeline.lib import EmbeddingBackfill, backfill_definitions, job_name
from backfill_pipeline.partitions import partition_activity
from backfill_pipeline.stores import open_store

from .conftest import REPO, query, subprocess_env, write_config
from .graph_helpers import metadata, register, schedule_tick, sensor_tick
from .test_postgres_scenarios import migrate, posting, sql

BIN = Path(sys.executable).parent


def _dataset(database_url: object, **extra: object) -> dict:
    return {
        "database_url": database_url,
        "table": "job_postings",
        "text": {"template": "{title} at {company}\n\n{description}", "required_columns": ["description"]},
        "embedding": {"dimension": 64},
        "enrichment": {"enabled": True},
        "partitioning": {"width": 100},
        **extra,
    }


def _user_project(root: Path, db: Path) -> Path:
    """A fresh dg project as `create-dagster project` lays it out (package, pyproject, definitions.py that
    loads defs/), holding nothing of ours but one defs.yaml using the component."""
    (root / "acme_search" / "defs" / "postings").mkdir(parents=True)
    (root / "acme_search" / "__init__.py").write_text("")
    (root / "acme_search" / "definitions.py").write_text(
        textwrap.dedent(
            """\
            from pathlib import Path

            import dagster as dg


            @dg.definitions
            def defs():
                return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
            """
        )
    )
    (root / "acme_search" / "defs" / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            """\
            [project]
            name = "acme-search"
            version = "0.1.0"

            [tool.dg]
            directory_type = "project"

            [tool.dg.project]
            root_module = "acme_search"
            """
        )
    )
    attributes = {"datasets": {"jobs": _dataset(f"sqlite:///{db}")}}
    (root / "acme_search" / "defs" / "postings" / "defs.yaml").write_text(
        yaml.safe_dump({"type": "backfill_pipeline.EmbeddingBackfill", "attributes": attributes}, sort_keys=False)
    )
    return root


def test_drop_in_defs_yaml_in_a_fresh_project(tmp_path: Path) -> None:
    db = create_demo_database(tmp_path / "postings.sqlite", rows=250, seed=3)
    project = _user_project(tmp_path / "acme", db)
    home = tmp_path / "home"
    home.mkdir()
    env = {"DAGSTER_HOME": str(home), "PYTHONPATH": str(project), "VIRTUAL_ENV": str(BIN.parent)}
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"

    def dg_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "dg"), *args],
            cwd=project,
            env=subprocess_env(**env),
            capture_output=True,
            text=True,
            timeout=300,
        )

    listed = dg_cli("list", "components")
    assert "backfill_pipeline.EmbeddingBackfill" in listed.stdout, listed.stderr[-2000:]
    checked = dg_cli("check", "defs")
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]

    listed_defs = subprocess.run(
        [str(BIN / "dg"), "list", "defs", "--json"],
        cwd=project,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
    )
    assert '"jobs/raw_rows"' in listed_defs.stdout and '"jobs/written_table"' in listed_defs.stdout, listed_defs.stderr

    # migrate and register as an operator would (in a subprocess: an instance opened in this process would
    # stay behind in Dagster's process-wide state for later tests)
    config = parse_config({"datasets": {"jobs": _dataset(f"sqlite:///{db}")}})
    with open_store("jobs", config.datasets["jobs"]) as store:
        store.migrate()
        keys = [k for k, _ in partition_activity(store.rows, config.datasets["jobs"])]
    add = "import sys, dagster as dg; dg.DagsterInstance.get().add_dynamic_partitions('jobs_partitions', sys.argv[1:])"
    subprocess.run([sys.executable, "-c", add, *keys], env=subprocess_env(**env), check=True)

    other_partition = query(db, "SELECT id, embedding FROM job_postings WHERE id < 100 ORDER BY id")
    launched = dg_cli("launch", "--assets", "group:jobs", "--partition", keys[1])
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-3000:]
    done = query(db, "SELECT COUNT(*) FROM job_postings WHERE id BETWEEN 100 AND 199 AND embedding IS NOT NULL")
    todo = query(db, "SELECT COUNT(*) FROM job_postings WHERE id BETWEEN 100 AND 199 AND trim(description) != ''")
    assert done == todo and todo[0][0] > 0
    assert query(db, "SELECT id, embedding FROM job_postings WHERE id < 100 ORDER BY id") == other_partition


def test_component_validates_inline_datasets_like_a_config_file(tmp_path: Path) -> None:
    bad = _dataset("sqlite:///x.db")
    bad["embedding"] = {"dimension": 64, "dimensions": 64}
    with pytest.raises(ConfigError, match="dataset 'jobs', key 'embedding.dimensions': unknown key"):
        EmbeddingBackfill(datasets={"jobs": bad}).backfill_config()
    with pytest.raises(ConfigError, match="config_file is empty: set BACKFILL_CONFIG"):
        EmbeddingBackfill(config_file="").backfill_config()
    with pytest.raises(ConfigError, match="either config_file or datasets"):
        EmbeddingBackfill(config_file="a.yaml", datasets={"jobs": bad}).backfill_config()
    beside = write_config(tmp_path, {"datasets": {"jobs": _dataset("sqlite:///x.db")}})
    found = EmbeddingBackfill(config_file=beside.name).backfill_config(component_dir=tmp_path)
    assert found.datasets["jobs"].embedding.dimension == 64


# -- a database URL from the environment, as the README's production config writes it ------------------
@pytest.fixture
def env_url_dataset(pg_db, monkeypatch: pytest.MonkeyPatch):
    """A jobs table in Postgres whose URL the config names only as {env: JOBS_DATABASE_URL}."""
    url, schema = pg_db
    sql(
        url, f'CREATE TABLE "{schema}".job_postings (id bigint PRIMARY KEY, title text, company text, description text)'
    )
    with psycopg.connect(url) as conn:
        conn.cursor().executemany(
            f'INSERT INTO "{schema}".job_postings VALUES (%s, %s, %s, %s)', [(i, *posting(i)) for i in range(1, 151)]
        )
    monkeypatch.setenv("JOBS_DATABASE_URL", url)
    config = parse_config({"datasets": {"jobs": _dataset({"env": "JOBS_DATABASE_URL"}, schema=schema)}})
    migrate(config)
    return url, schema, config


def test_sensor_schedule_and_check_read_the_url_from_the_environment(
    env_url_dataset, instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, schema, config = env_url_dataset
    defs = backfill_definitions(config)
    tick = sensor_tick(defs, "jobs_new_rows_sensor", instance)
    keys = ["0000000000-0000000099", "0000000100-0000000199"]
    assert [r.partition_key for r in tick.run_requests] == keys and json.loads(tick.cursor) == {"mode": "id", "id": 150}
    register(config, "jobs", instance)

    result = defs.resolve_job_def(job_name("jobs")).execute_in_process(partition_key=keys[1], instance=instance)
    assert metadata(result, "written_table")["rows_written"] == 51  # ids 100..150
    check = result.get_asset_check_evaluations()
    assert {c.check_name: c.passed for c in check} == dict.fromkeys(
        ("embedding_coverage", "vectors_valid", "no_placeholders", "failure_rate"), True
    )

    scheduled = schedule_tick(defs, "jobs_refresh_schedule", instance, datetime(2026, 1, 1, 6))
    assert [r.partition_key for r in scheduled.run_requests] == [keys[0]]  # the one still needing work

    monkeypatch.delenv("JOBS_DATABASE_URL")
    message = "dataset 'jobs': environment variable JOBS_DATABASE_URL is not set"
    assert message in _error_chain(lambda: sensor_tick(defs, "jobs_new_rows_sensor", instance))
    assert message in _error_chain(lambda: schedule_tick(defs, "jobs_refresh_schedule", instance, datetime(2026, 1, 1)))
    failed = defs.resolve_job_def(job_name("jobs")).execute_in_process(
        partition_key=keys[0], instance=instance, raise_on_error=False
    )
    assert not failed.success
    step_failure = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
    assert message in str(step_failure.event_specific_data.error.message)
    assert url not in str(step_failure.event_specific_data.error.message)


def _error_chain(evaluate) -> str:
    """The messages of the exception ``evaluate`` raises and of its causes (Dagster wraps user errors)."""
    with pytest.raises(Exception) as raised:
        evaluate()
    messages, error = [], raised.value
    while error is not None:
        messages.append(str(error))
        error = error.__cause__
    return "\n".join(messages)


def test_dagster_sensor_preview_with_an_env_url(env_url_dataset, tmp_path: Path) -> None:
    """The command from the bug report: the code location loads without reading the variable, and the
    sensor reads it when it runs."""
    url, schema, _ = env_url_dataset
    config = write_config(tmp_path, {"datasets": {"jobs": _dataset({"env": "JOBS_DATABASE_URL"}, schema=schema)}})
    home = tmp_path / "home"
    home.mkdir()
    args = [str(BIN / "dagster"), "sensor", "preview", "jobs_new_rows_sensor", "-m", "backfill_pipeline.definitions"]
    env = {"BACKFILL_CONFIG": str(config), "DAGSTER_HOME": str(home)}
    ok = subprocess.run(
        args, cwd=REPO, env=subprocess_env(JOBS_DATABASE_URL=url, **env), capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-3000:]
    assert "2 new partitions, 2 runs requested" in ok.stdout + ok.stderr
    without_url = subprocess_env(**env)
    without_url.pop("JOBS_DATABASE_URL")
    unset = subprocess.run(args, cwd=REPO, env=without_url, capture_output=True, text=True)
    assert "environment variable JOBS_DATABASE_URL is not set" in unset.stdout + unset.stderr
    assert "unsupported database URL scheme" not in unset.stdout + unset.stderr


def test_code_location_needs_a_config_and_says_so(tmp_path: Path) -> None:
    """At the repository root with nothing set: the local dagster.yaml needs nothing, and without
    BACKFILL_CONFIG the code location stops with one sentence naming it (no silent demo)."""
    args = [str(BIN / "dagster"), "definitions", "validate", "-m", "backfill_pipeline.definitions"]
    done = subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "config_file is empty: set BACKFILL_CONFIG" in out
    assert "DAGSTER_POSTGRES_URL" not in out  # the production instance config is not read here
    assert "job_postings" not in out  # the demo's table was never looked at


def test_dg_check_defs_at_the_repository_root(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"datasets": {"jobs": _dataset({"env": "JOBS_DATABASE_URL"})}})
    env = subprocess_env(BACKFILL_CONFIG=str(config), VIRTUAL_ENV=str(BIN.parent))
    env.pop("JOBS_DATABASE_URL", None)  # loading reads no secret
    done = subprocess.run([str(BIN / "dg"), "check", "defs"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_dg_scaffold_defs_writes_a_valid_example(tmp_path: Path) -> None:
    project = _user_project(tmp_path / "acme", tmp_path / "unused.sqlite")
    env = {"PYTHONPATH": str(project), "VIRTUAL_ENV": str(BIN.parent)}
    args = [str(BIN / "dg"), "scaffold", "defs", "backfill_pipeline.EmbeddingBackfill", "more_postings"]
    done = subprocess.run(args, cwd=project, env=subprocess_env(**env), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    written = yaml.safe_load((project / "acme_search" / "defs" / "more_postings" / "defs.yaml").read_text())
    assert written["type"] == "backfill_pipeline.EmbeddingBackfill"
    config = EmbeddingBackfill(**written["attributes"]).backfill_config()
    assert config.datasets["jobs"].database_url.env == "JOBS_DATABASE_URL"  # a secret by reference only
