"""The deploy files, checked as far as this machine allows (no Docker, no cluster): they parse, and every
module, command, file, path and variable they name exists in the code or in each other."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from backfill_pipeline.config import load_config

from .conftest import REPO

DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
MODULE = "backfill_pipeline.definitions"


def _config_variables() -> set[str]:
    """The environment variables the example config reads."""
    text = (DEPLOY / "backfill.example.yaml").read_text()
    return set(re.findall(r"\{env: ([A-Z_]+)", text)) | set(re.findall(r"api_key_env: ([A-Z_]+)", text))


def test_the_dockerfile_copies_what_exists_and_runs_the_code_location() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert all((REPO / source).exists() for sources in copies for source in sources), copies
    assert any(line.startswith("USER ") and "root" not in line for line in lines)  # not root
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [default_extras] = [line.split("=", 1)[1] for line in lines if line.startswith("ARG EXTRAS=")]
    assert default_extras in extras
    cmd = next(line for line in lines if line.startswith("CMD "))
    assert MODULE in cmd and importlib.util.find_spec(MODULE) is not None
    assert "BACKFILL_CONFIG=/config/backfill.yaml" in "\n".join(lines)


def test_compose_wires_storage_config_and_secrets() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) >= {"postgres", "code", "webserver", "daemon"}
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    storage_variable = instance["storage"]["postgres"]["postgres_url"]["env"]
    for name in ("code", "webserver", "daemon"):
        service = services[name]
        env = service["environment"]
        assert storage_variable in env and env[storage_variable].startswith("postgresql+psycopg2://")
        assert _config_variables() <= set(env), _config_variables() - set(env)
        mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
        assert (DEPLOY / mounts[env["BACKFILL_CONFIG"]]).exists()
        command = service.get("command")
        if command:
            assert (BIN / command[0]).exists() or shutil.which(command[0]), command[0]
    assert "${POSTGRES_PASSWORD}" in (DEPLOY / "compose.yaml").read_text()  # never the secret itself
    workspace = yaml.safe_load((DEPLOY / "workspace.docker.yaml").read_text())["load_from"][0]["grpc_server"]
    local = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    assert workspace["host"] in services and workspace["location_name"] == local["location_name"]
    for mount in services["postgres"]["volumes"]:
        source = mount.split(":")[0]
        assert source.startswith("pgdata") or (DEPLOY / source).exists()


def test_helm_values_run_this_module_with_secrets_and_the_config_map() -> None:
    values = yaml.safe_load((DEPLOY / "helm-values.yaml").read_text())
    [deployment] = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", MODULE]
    env = {e["name"]: e["value"] for e in deployment["env"]}
    [mount] = deployment["volumeMounts"]
    assert Path(env["BACKFILL_CONFIG"]).parent == Path(mount["mountPath"])
    assert env["BACKFILL_INTERMEDIATES"].startswith("s3://")  # steps and retries in new pods share them
    header = (DEPLOY / "helm-values.yaml").read_text().split("dagster-user-deployments:")[0]
    secret_keys = set(re.findall(r"--from-literal=([A-Z_]+)=", header))
    assert _config_variables() <= secret_keys | set(env)
    assert values["runLauncher"]["type"] == "K8sRunLauncher"


def test_the_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKFILL_INTERMEDIATES", "s3://my-bucket/backfill")
    config = load_config(DEPLOY / "backfill.example.yaml")
    assert config.execution.intermediates_url == "s3://my-bucket/backfill"
    assert config.datasets["jobs"].embedding.resolved_api_key_env == "OPENAI_API_KEY"
