"""Config validation: each mistake gives one message naming the dataset and the key."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from backfill_pipeline.config import ConfigError, demo_config_path, load_config, parse_config

VALID = {
    "datasets": {
        "jobs": {
            "database_url": "sqlite:///jobs.db",
            "table": "jobs",
            "text": {"columns": ["title", "description"]},
            "embedding": {"dimension": 768},
        }
    }
}


def broken(path: list[str], value=None, delete: bool = False) -> dict:
    data = copy.deepcopy(VALID)
    node = data
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (broken(["datasets", "jobs", "embeding"], {"dimension": 3}), "dataset 'jobs', key 'embeding': unknown key"),
        (broken(["datasets", "jobs", "embedding", "dimension"], "big"), "dataset 'jobs', key 'embedding.dimension'"),
        (
            broken(["datasets", "jobs", "embedding", "dimension"], 0),
            "key 'embedding.dimension': Input should be greater",
        ),
        (broken(["datasets", "jobs", "table"], delete=True), "dataset 'jobs', key 'table': Field required"),
        (broken(["datasets", "jobs", "embedding", "provider"], "cohere"), "key 'embedding.provider'"),
        (
            broken(["datasets", "jobs", "database_url"], "postgresql://u:hunter2@db/x"),
            "key 'database_url': must not hold a password",
        ),
        (broken(["datasets", "jobs", "text"], {"columns": ["a"], "template": "{a}"}), "exactly one of"),
        (broken(["datasets", "jobs", "text"], {"template": "{title!r}"}), "must be a plain column name"),
        (broken(["datasets", "jobs", "partitioning"], {"kind": "archive"}), "needs 'archive_column'"),
        (broken(["datasets", "jobs", "target"], {"mode": "table"}), "key 'target': Value error, mode 'table' needs"),
        (broken(["datasets", "Jobs!"], {}), "dataset name 'Jobs!': String should match pattern"),
        (broken(["datasets", "jobs", "embedding", "api_key"], "sk-secret"), "key 'embedding.api_key': unknown key"),
        ({"datasets": {}}, "key 'datasets'"),
    ],
)
def test_each_error_names_dataset_and_key(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml")
    message = str(info.value)
    assert "invalid backfill config test.yaml" in message
    assert expected.replace("Value error, ", "") in message
    assert "hunter2" not in message and "sk-secret" not in message  # secrets never echoed


def test_two_datasets_side_by_side() -> None:
    data = copy.deepcopy(VALID)
    data["datasets"]["summaries"] = {
        "database_url": {"env": "CHAT_DATABASE_URL", "default": "sqlite:///chat.db"},
        "table": "summaries",
        "text": {"columns": ["content"]},
        "embedding": {"dimension": 1536, "column": "content_embedding"},
    }
    config = parse_config(data)
    assert list(config.datasets) == ["jobs", "summaries"]
    assert config.datasets["summaries"].database_url_value() == "sqlite:///chat.db"


def test_env_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    data = broken(["datasets", "jobs", "database_url"], {"env": "JOBS_DB"})
    config = parse_config(data)
    with pytest.raises(ConfigError, match="JOBS_DB is not set"):
        config.datasets["jobs"].database_url_value()
    monkeypatch.setenv("JOBS_DB", "sqlite:///other.db")
    assert config.datasets["jobs"].database_url_value() == "sqlite:///other.db"


def test_template_fields_and_result_columns() -> None:
    data = broken(["datasets", "jobs", "text"], {"template": "{title} at {company}\n\n{description}"})
    data["datasets"]["jobs"]["enrichment"] = {"enabled": True, "columns": {"skills": "skill_list"}}
    ds = parse_config(data).datasets["jobs"]
    assert ds.text.fields == ["title", "company", "description"]
    assert "skill_list" in ds.result_columns and "seniority" in ds.result_columns


def test_yaml_errors_and_missing_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read backfill config"):
        load_config(tmp_path / "absent.yaml")


def test_builtin_demo_config_loads_only_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(demo_config_path())
    embedding = config.datasets["jobs"].embedding
    assert (embedding.provider, embedding.model, embedding.dimension) == ("local", "wordllama-l2-supercat", 256)
    assert config.datasets["jobs"].enrichment.enabled
    assert config.datasets["jobs"].store_kind == "sqlite"
    monkeypatch.delenv("BACKFILL_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="^no backfill config: set BACKFILL_CONFIG") as raised:
        load_config()
    assert "\n" not in str(raised.value)


def test_store_kind_comes_from_the_config_not_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    def kind(**extra: object) -> str:
        data = {"database_url": {"env": "SOME_DB_URL"}, "table": "t", "text": {"columns": ["b"]}}
        data["embedding"] = {"dimension": 4}
        return parse_config({"datasets": {"d": {**data, **extra}}}).datasets["d"].store_kind

    monkeypatch.setenv("SOME_DB_URL", "sqlite:///somewhere.db")  # never read for the kind
    assert kind() == "postgres"
    assert kind(database_kind="sqlite") == "sqlite"
    assert kind(database_url={"env": "SOME_DB_URL", "default": "sqlite:///x.db"}) == "sqlite"


def test_relative_sqlite_paths_are_relative_to_the_config_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command, the UI and the daemon find the same database, whatever folder they start in."""
    import subprocess
    import sys

    from backfill_pipeline.config import load_config
    from backfill_pipeline.demo_data import create_demo_database

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    create_demo_database(project / "data" / "jobs.sqlite", rows=20, seed=1)
    url = {"env": "UNSET_JOBS_URL", "default": "sqlite:///data/jobs.sqlite"}
    dataset = {"database_url": url, "table": "job_postings", "text": {"columns": ["title"]}}
    path = project / "backfill.yaml"
    path.write_text(yaml.safe_dump({"datasets": {"jobs": {**dataset, "embedding": {"dimension": 768}}}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_config(path).datasets["jobs"]
    assert loaded.database_url_value() == f"sqlite:///{project / 'data' / 'jobs.sqlite'}"
    cli = str(Path(sys.executable).parent / "backfill-pipeline")
    env = {**os.environ, "BACKFILL_CONFIG": str(path), "DAGSTER_HOME": str(tmp_path)}
    for command in ("migrate", "coverage"):
        done = subprocess.run([cli, command], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert "jobs" in done.stdout and "(all)" in done.stdout
