"""The README's production section, as written: a Postgres-backed instance, dagster-webserver and
dagster-daemon, and a partition backfill launched through the GraphQL API as the UI launches it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from .conftest import REPO, subprocess_env, write_config
from .pg import create_database, drop_database
from .test_postgres_scenarios import posting, sql

BIN = Path(sys.executable).parent
ASSETS = ["raw_rows", "detected_placeholders", "llm_enrichment", "embeddings", "written_table"]
LAUNCH = """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
STATUS = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  __typename ... on PartitionBackfill { status } ... on PythonError { message } } }"""


def _graphql(port: int, query: str, variables: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["data"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def production(tmp_path: Path, pg_server_url: str):
    dagster_db = create_database(pg_server_url)
    data_db = create_database(pg_server_url)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    yield home, dagster_db, data_db
    drop_database(pg_server_url, dagster_db)
    drop_database(pg_server_url, data_db)


def test_partition_backfill_through_webserver_and_daemon(production, tmp_path: Path) -> None:
    home, dagster_db, data_db = production
    sql(
        data_db,
        "CREATE TABLE jobs_enriched (id bigint PRIMARY KEY, title text, company text, description text, "
        "embedding jsonb)",
    )
    with psycopg.connect(data_db) as conn:
        conn.cursor().executemany(
            "INSERT INTO jobs_enriched (id, title, company, description) VALUES (%s,%s,%s,%s)",
            [(i, *posting(i)) for i in range(1, 121)],
        )
    config = write_config(
        tmp_path,
        {
            "datasets": {
                "jobs": {
                    "database_url": {"env": "JOBS_DATABASE_URL"},
                    "table": "jobs_enriched",
                    "text": {"template": "{title} at {company}\n\n{description}"},
                    "embedding": {"dimension": 768},
                    "enrichment": {"enabled": True},
                    "partitioning": {"width": 50},
                }
            }
        },
    )
    env = subprocess_env(
        BACKFILL_CONFIG=str(config),
        JOBS_DATABASE_URL=data_db,
        DAGSTER_HOME=str(home),
        DAGSTER_POSTGRES_URL=dagster_db.replace("postgresql", "postgresql+psycopg2", 1),
    )
    cli = str(BIN / "backfill-pipeline")
    for args in (["migrate"], ["register"], ["pools", "--embedding", "2", "--llm", "2"]):
        done = subprocess.run([cli, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    port = _port()
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = [
        subprocess.Popen(
            [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO,
            env=env,
            stdout=(logs / "web.out").open("w"),
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
            cwd=REPO,
            env=env,
            stdout=(logs / "daemon.out").open("w"),
            stderr=subprocess.STDOUT,
        ),
    ]
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, (logs / "web.out").read_text()[-3000:]
                time.sleep(1)
        keys = ["0000000000-0000000049", "0000000050-0000000099", "0000000100-0000000149"]
        launched = _graphql(
            port,
            LAUNCH,
            {"params": {"assetSelection": [{"path": ["jobs", a]} for a in ASSETS], "partitionNames": keys}},
        )
        result = launched["launchPartitionBackfill"]
        assert result["__typename"] == "LaunchBackfillSuccess", result
        status = None
        deadline = time.time() + 360
        while time.time() < deadline:
            status = _graphql(port, STATUS, {"id": result["backfillId"]})["partitionBackfillOrError"]["status"]
            if status not in ("REQUESTED", "CANCELING"):
                break
            time.sleep(2)
        assert status in ("COMPLETED", "COMPLETED_SUCCESS"), (status, (logs / "daemon.out").read_text()[-3000:])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    counts = sql(
        data_db,
        "SELECT count(*) FILTER (WHERE jsonb_array_length(embedding) = 768 "
        "AND summary IS NOT NULL), count(*) FROM jobs_enriched",
    )[0]
    assert counts == (120, 120)
    runs = sql(dagster_db, "SELECT count(*) FROM runs WHERE status = 'SUCCESS'")[0][0]
    assert runs == 3  # one run per partition, recorded in Dagster's Postgres storage
