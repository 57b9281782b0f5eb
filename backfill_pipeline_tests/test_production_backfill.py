"""The README's production section, as written: a Postgres-backed instance, dagster-webserver and
dagster-daemon, and a partition backfill launched through the GraphQL API as the UI launches it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from .conftest import REPO, subprocess_env, write_config
from .fake_providers import OPENAI_KEY, FakeProviderServer, ModelLimits
from .test_postgres_scenarios import posting, sql

BIN = Path(sys.executable).parent
ASSETS = ["raw_rows", "detected_placeholders", "llm_enrichment", "embeddings", "written_table"]
LAUNCH = """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
TERMINATE = """mutation($runId: String!) { terminateRun(runId: $runId) {
  __typename ... on PythonError { message } ... on TerminateRunFailure { message } } }"""
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


# dagster-daemon itself, its loop shortened from 30 s to 5 s (a module constant in Dagster 1.13, read each
# loop by the backfill daemon and when the asset daemon starts): the tests wait for it less, nothing else changes
FAST_DAEMON = (
    "import sys; import dagster._daemon.controller as controller; controller.DEFAULT_DAEMON_INTERVAL_SECONDS = 5; "
    "from dagster._daemon.cli import main; sys.argv[0] = 'dagster-daemon'; sys.exit(main())"
)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _services(env: dict, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dagster-webserver and dagster-daemon on the project's workspace: (webserver port, log folder)."""
    port = _port()
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    procs = [
        subprocess.Popen(
            [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO,
            env=env,
            stdout=(logs / "web.out").open("w"),
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [str(BIN / "python"), "-c", FAST_DAEMON, "run", "-w", "workspace.yaml"],
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
        yield port, logs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _launch(port: int, keys: list[str]) -> dict:
    """A partition backfill of the whole graph, launched as the UI launches it."""
    launched = _graphql(
        port, LAUNCH, {"params": {"assetSelection": [{"path": ["jobs", a]} for a in ASSETS], "partitionNames": keys}}
    )
    result = launched["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    return result


def _backfill_status(port: int, backfill_id: str, timeout: float = 360) -> str | None:
    status = None
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _graphql(port, STATUS, {"id": backfill_id})["partitionBackfillOrError"]["status"]
        if status not in ("REQUESTED", "CANCELING"):
            break
        time.sleep(2)
    return status


def _project(production, tmp_path: Path, rows: int, uuid_keys: bool = False, **dataset: object) -> dict:
    """A table of ``rows`` postings (keyed by bigint, or by UUID as Supabase tables are), a config reading
    its URL from the environment, migrated and registered by the CLI: the environment for the webserver
    and the daemon."""
    home, dagster_db, data_db = production
    key = "id uuid PRIMARY KEY DEFAULT gen_random_uuid()" if uuid_keys else "id bigint PRIMARY KEY"
    sql(data_db, f"CREATE TABLE jobs_enriched ({key}, title text, company text, description text, embedding jsonb)")
    with psycopg.connect(data_db) as conn:
        conn.cursor().executemany(
            "INSERT INTO jobs_enriched (title, company, description) VALUES (%s,%s,%s)"
            if uuid_keys
            else "INSERT INTO jobs_enriched (id, title, company, description) VALUES (%s,%s,%s,%s)",
            [posting(i) if uuid_keys else (i, *posting(i)) for i in range(1, rows + 1)],
        )
    jobs = {
        "database_url": {"env": "JOBS_DATABASE_URL"},
        "table": "jobs_enriched",
        "text": {"template": "{title} at {company}\n\n{description}"},
        "embedding": {"dimension": 768},
        "enrichment": {"enabled": True},
        "partitioning": {"width": 50},
        **dataset,
    }
    env = subprocess_env(
        BACKFILL_CONFIG=str(write_config(tmp_path, {"datasets": {"jobs": jobs}})),
        JOBS_DATABASE_URL=data_db,
        DAGSTER_HOME=str(home),
        DAGSTER_POSTGRES_URL=dagster_db.replace("postgresql", "postgresql+psycopg2", 1),
        OPENAI_API_KEY=OPENAI_KEY,
    )
    cli = str(BIN / "backfill-pipeline")
    for args in (["migrate"], ["register"], ["pools", "--embedding", "2", "--llm", "2"]):
        done = subprocess.run([cli, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    return env


def test_a_run_terminated_from_the_ui_writes_what_it_paid_for(production, tmp_path: Path) -> None:
    """The UI's Terminate on a run mid-enrichment: the requests in flight finish, the completed rows are
    written, the lease is released, the run ends canceled, not retried; the next backfill pays for nothing
    twice."""
    _, dagster_db, data_db = production
    server = FakeProviderServer().start()
    server.limits["gpt-4o-mini"] = ModelLimits(latency_seconds=0.2)
    openai = {"provider": "openai", "base_url": server.openai_url, "retry": {"transient_base_seconds": 0.05}}
    env = _project(
        production,
        tmp_path,
        rows=120,
        partitioning={"width": 200},
        lease_seconds=300,
        embedding={**openai, "model": "text-embedding-3-small", "dimension": 768},
        enrichment={**openai, "enabled": True, "model": "gpt-4o-mini", "max_in_flight": 2},
    )
    key = "0000000000-0000000199"
    try:
        with _services(env, tmp_path) as (port, logs):
            _launch(port, [key])
            deadline = time.time() + 180
            while server.count("chat", 200) < 10:
                assert time.time() < deadline, (logs / "daemon.out").read_text()[-3000:]
                time.sleep(0.05)
            [(run_id,)] = sql(dagster_db, "SELECT run_id FROM runs")
            terminated = _graphql(port, TERMINATE, {"runId": run_id})["terminateRun"]
            assert terminated["__typename"] == "TerminateRunSuccess", terminated
            deadline = time.time() + 120
            while (status := sql(dagster_db, "SELECT status FROM runs")[0][0]) not in ("CANCELED", "FAILURE"):
                assert time.time() < deadline, status
                time.sleep(0.5)
            assert status == "CANCELED"
            written = sql(data_db, "SELECT count(*) FROM jobs_enriched WHERE enrichment_model = 'gpt-4o-mini'")[0][0]
            assert 10 <= written < 120  # what was answered is written; the rest was never sent
            assert written >= server.count("chat", 200) - 2  # at most the requests in flight were not written
            assert sql(data_db, "SELECT count(*) FROM backfill_leases")[0][0] == 0
            events = "SELECT count(*) FROM event_logs WHERE dagster_event_type = 'STEP_UP_FOR_RETRY'"
            assert sql(dagster_db, events)[0][0] == 0

            result = _launch(port, [key])
            status = _backfill_status(port, result["backfillId"])
            assert status in ("COMPLETED", "COMPLETED_SUCCESS"), (logs / "daemon.out").read_text()[-3000:]
    finally:
        server.stop()
    assert server.repeated_texts("chat") == 0  # every answer of the canceled run was kept
    pending = "SELECT count(*) FROM jobs_enriched WHERE summary IS NULL OR embedding IS NULL"
    assert sql(data_db, pending)[0][0] == 0
