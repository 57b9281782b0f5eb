"""The commands a user types, run as subprocesses: the README's main job, the CLI, and Dagster's own CLI."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np

from backfill_pipeline.detection import classify_vectors
from backfill_pipeline.rows import vector_array

from .conftest import demo_config_dict, query, subprocess_env, write_config

BIN = Path(sys.executable).parent


def run(args: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout)


def test_readme_main_job_on_a_small_demo(tmp_path: Path) -> None:
    env = subprocess_env()
    env.pop("BACKFILL_CONFIG", None)
    env.pop("DAGSTER_HOME", None)
    done = subprocess.run(
        [str(BIN / "backfill-pipeline"), "demo", "--rows", "300", "--fresh"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    before, after = out.split("coverage before:")[1].split("coverage after:")
    assert "100.0%" not in before and "null_embedding=" in before
    row = next(line.split() for line in after.splitlines() if "(all)" in line)
    assert row[:2] == ["jobs", "(all)"] and row[2] == "300"
    assert row[3] == row[4] and row[5] == "100.0%"  # every row with text is covered
    assert "rows/s" in out
    db = tmp_path / ".backfill" / "demo_jobs.sqlite"
    rows = query(db, "SELECT embedding, skills, seniority, summary FROM job_postings WHERE description != ''")
    vectors = [np.array(json.loads(r[0]), dtype=np.float32) for r in rows]
    assert set(classify_vectors(vector_array(vectors), 256)) == {"ok"}  # the semantic local embedder
    assert all(r[1] and r[2] and r[3] for r in rows)
    assert (tmp_path / ".dagster_home" / "dagster.yaml").exists()


def test_register_then_dagster_asset_materialize_one_partition(tmp_path: Path) -> None:
    db = tmp_path / "demo.sqlite"
    config = write_config(tmp_path, demo_config_dict(db))
    env = {"BACKFILL_CONFIG": str(config), "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    cli = str(BIN / "backfill-pipeline")
    made = run([cli, "create-demo-db", "--rows", "250", "--path", str(db)], tmp_path, **env)
    assert made.returncode == 0, made.stderr
    registered = run([cli, "register"], tmp_path, **env)
    assert "jobs: 3 partitions (3 newly registered)" in registered.stdout, registered.stderr

    before = query(db, "SELECT COUNT(*) FROM job_postings WHERE id BETWEEN 100 AND 199 AND embedding IS NULL")[0][0]
    assert before > 0
    done = run(
        [
            str(BIN / "dagster"),
            "asset",
            "materialize",
            "-m",
            "backfill_pipeline.definitions",
            "--select",
            "group:jobs",
            "--partition",
            "0000000100-0000000199",
        ],
        tmp_path,
        **env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RUN_SUCCESS" in done.stderr
    missing = query(
        db,
        "SELECT COUNT(*) FROM job_postings WHERE id BETWEEN 100 AND 199 AND description != '' "
        "AND (embedding IS NULL OR summary IS NULL)",
    )[0][0]
    assert missing == 0
    untouched = query(db, "SELECT COUNT(*) FROM job_postings WHERE id < 100 AND embedding IS NULL")[0][0]
    assert untouched > 0  # other partitions were not run

    coverage = run([cli, "coverage", "--by-partition"], tmp_path, **env)
    lines = [line for line in coverage.stdout.splitlines() if "0000000100-0000000199" in line]
    assert len(lines) == 1 and "100.0%" in lines[0]

    plan = run([cli, "plan"], tmp_path, **env)
    assert "null_embedding" in plan.stdout and "dry run: no provider was called" in plan.stdout
    assert query(db, "SELECT COUNT(*) FROM job_postings WHERE id < 100 AND embedding IS NULL")[0][0] == untouched
    failures = run([cli, "failures"], tmp_path, **env)
    assert "no failures recorded" in failures.stdout


def test_definitions_validate(tmp_path: Path) -> None:
    env = {"BACKFILL_CONFIG": str(write_config(tmp_path, demo_config_dict(tmp_path / "x.sqlite")))}
    done = run(
        [str(BIN / "dagster"), "definitions", "validate", "-m", "backfill_pipeline.definitions"], tmp_path, **env
    )
    assert done.returncode == 0, done.stderr
    assert "All code locations passed validation" in done.stderr + done.stdout


def test_config_errors_reach_the_user(tmp_path: Path) -> None:
    data = demo_config_dict(tmp_path / "x.sqlite")
    data["datasets"]["jobs"]["embedding"]["dimensions"] = 768
    env = {"BACKFILL_CONFIG": str(write_config(tmp_path, data))}
    done = run([str(BIN / "backfill-pipeline"), "coverage"], tmp_path, **env)
    assert done.returncode == 2
    assert "dataset 'jobs', key 'embedding.dimensions': unknown key" in done.stderr
    validate = run(
        [str(BIN / "dagster"), "definitions", "validate", "-m", "backfill_pipeline.definitions"], tmp_path, **env
    )
    assert validate.returncode != 0 and "embedding.dimensions" in validate.stderr + validate.stdout


def _at_terminal(args: list[str], answer: str, env: dict, cwd: Path) -> str:
    """Run a command with a pseudo-terminal as its input (so it is interactive) and type ``answer``."""
    import os
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=subprocess_env(**env),
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    os.close(follower)
    os.write(leader, (answer + "\n").encode())
    out, _ = proc.communicate(timeout=300)
    os.close(leader)
    return out


def _demo_project(tmp_path: Path, rows: int) -> tuple[Path, dict[str, str], str]:
    """A demo database of ``rows`` postings made by the CLI, its config and a Dagster home: (db, env, cli)."""
    db = tmp_path / "demo.sqlite"
    config = write_config(tmp_path, demo_config_dict(db))
    env = {"BACKFILL_CONFIG": str(config), "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    cli = str(BIN / "backfill-pipeline")
    assert run([cli, "create-demo-db", "--rows", str(rows), "--path", str(db)], tmp_path, **env).returncode == 0
    return db, env, cli


def test_interactive_materialize_shows_the_plan_and_asks(tmp_path: Path) -> None:
    db, env, cli = _demo_project(tmp_path, 120)
    assert run([cli, "register"], tmp_path, **env).returncode == 0
    nulls = "SELECT count(*) FROM job_postings WHERE embedding IS NULL AND description != ''"
    before = query(db, nulls)[0][0]

    declined = _at_terminal([cli, "materialize"], "no", env, tmp_path)
    assert "null_embedding" in declined and "Continue? (yes/no)" in declined and "nothing done" in declined
    assert query(db, nulls)[0][0] == before > 0  # nothing was paid for or written

    accepted = _at_terminal([cli, "materialize"], "yes", env, tmp_path)
    assert "rows written" in accepted and query(db, nulls)[0][0] == 0


def test_materialize_in_parallel_worker_processes(tmp_path: Path) -> None:
    db = tmp_path / "demo.sqlite"
    config = write_config(tmp_path, demo_config_dict(db, width=50))
    env = {"BACKFILL_CONFIG": str(config), "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    cli = str(BIN / "backfill-pipeline")
    assert run([cli, "create-demo-db", "--rows", "200", "--path", str(db)], tmp_path, **env).returncode == 0
    assert "5 partitions" in run([cli, "register"], tmp_path, **env).stdout
    done = run([cli, "materialize", "--parallel", "3"], tmp_path, **env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("  [")]  # one per partition
    assert len(lines) == 5 and all(": ok," in line for line in lines)
    assert len({line.split("(run ")[1] for line in lines}) == 5  # one Dagster run per partition
    left = query(
        db, "SELECT count(*) FROM job_postings WHERE description != '' AND (embedding IS NULL OR summary IS NULL)"
    )
    assert left[0][0] == 0


def test_operator_commands_for_scripts_and_pipes(tmp_path: Path) -> None:
    """JSON for scripts, pages that say what is left, `pools` that only shows, a closed pipe that is not an
    error, and one line (no traceback) for a mistake, with the traceback under --debug."""
    db, env, cli = _demo_project(tmp_path, 250)
    coverage = json.loads(run([cli, "coverage", "--json"], tmp_path, **env).stdout)
    total = next(c for c in coverage if c["partition"] == "(all)")
    assert (
        total["rows"] == 250 and total["covered"] < total["with_text"] and total["needing_work"]["null_embedding"] > 0
    )
    assert sum(c["rows"] for c in coverage if c["partition"] != "(all)") == 250

    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO backfill_failures VALUES ('jobs', ?, 'embedding', 'permanent', 'bad row', 1, ?, ?, 0)",
            [(str(i), f"2026-01-01T00:00:{i:02d}", f"2026-01-01T00:00:{i:02d}") for i in range(7)],
        )
    page = run([cli, "failures", "--limit", "3"], tmp_path, **env).stdout
    assert "7 failures recorded; showing 3 from 0 (4 more: --offset 3)" in page
    second = json.loads(run([cli, "failures", "--json", "--limit", "3", "--offset", "3"], tmp_path, **env).stdout)
    assert second["jobs"]["total"] == 7 and [f["row_id"] for f in second["jobs"]["failures"]] == ["3", "2", "1"]

    [status] = json.loads(run([cli, "status"], tmp_path, **env).stdout)
    assert (
        status["dataset"] == "jobs" and status["rows"] == 250 and status["failures"] == {"embedding": {"permanent": 7}}
    )
    assert sum(p["rows"] for p in status["partitions"]) == 250 and status["needing_work"] == total["needing_work"]
    [plan] = json.loads(run([cli, "plan", "--json"], tmp_path, **env).stdout)
    assert plan["rows"] == 250 and 0 < plan["embedding"]["rows"] <= total["with_text"]
    assert plan["embedding"]["requests"] >= 1 and plan["reasons"]["no_text"] == total["rows"] - total["with_text"]

    shown = run([cli, "pools"], tmp_path, **env)
    assert "limit not set" in shown.stdout
    run([cli, "pools", "--llm", "3"], tmp_path, **env)
    again = run([cli, "pools"], tmp_path, **env).stdout
    assert "pool llm_api: limit 3" in again and "pool embedding_api: limit not set" in again

    piped = subprocess.run(f"{cli} failures | head -1", shell=True, cwd=tmp_path, env=subprocess_env(**env),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert piped.returncode == 0 and "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr

    wrong = run([cli, "coverage", "--dataset", "nope"], tmp_path, **env)
    assert wrong.returncode == 2 and wrong.stderr.strip().count("\n") == 0 and "no dataset named 'nope'" in wrong.stderr
    (tmp_path / "broken.yaml").write_text("datasets: {jobs: {table: t}}")
    bad = run([cli, "--config", str(tmp_path / "broken.yaml"), "plan"], tmp_path, **env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    db.unlink()
    missing = run([cli, "coverage"], tmp_path, **env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and str(db.name) in missing.stderr
    debug = run([cli, "--debug", "coverage"], tmp_path, **env)
    assert "Traceback" in debug.stderr


def test_materialize_ends_with_a_summary_and_json_for_scripts(tmp_path: Path) -> None:
    db, env, cli = _demo_project(tmp_path, 250)
    assert run([cli, "register"], tmp_path, **env).returncode == 0
    keys = ["0000000000-0000000099", "0000000100-0000000199"]
    done = run([cli, "materialize", "--yes", "--json", *[f"--partition={k}" for k in keys]], tmp_path, **env)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)  # stdout holds the JSON alone; the partition lines went to stderr
    assert summary["partitions"] == {"ok": 2} and summary["exit_status"] == 0 and not summary["stopped"]
    written = query(db, "SELECT count(*) FROM job_postings WHERE id < 200 AND embedded_at > '2026'")[0][0]
    assert summary["rows_written"] == written > 0 and summary["rows_failed"] == 0
    assert summary["embedding_requests"] > 0 and summary["rows_written_per_second"] > 0
    assert f"{keys[0]}: ok," in done.stderr

    again = run([cli, "materialize", "--yes", f"--partition={keys[0]}"], tmp_path, **env)
    assert "summary: 1 partitions (1 ok)" in again.stdout
    assert "rows: 0 written, " in again.stdout and " up to date" in again.stdout


def test_at_a_terminal_materialize_shows_a_live_progress_bar(tmp_path: Path) -> None:
    """With a terminal as stdout, a bar over the partitions (done of all, rows, failures, cost, time left);
    in a pipe (the other tests), plain lines."""
    import os
    import pty

    db, env, cli = _demo_project(tmp_path, 250)
    assert run([cli, "register"], tmp_path, **env).returncode == 0
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [cli, "materialize", "--yes"], cwd=tmp_path, env=subprocess_env(**env, COLUMNS="160"),
        stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        screen += chunk
    assert proc.wait(timeout=300) == 0
    os.close(leader)
    drawn = screen.decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    assert "3/3 partitions" in text and "rows written, 0 failed, $0.0000" in text
    assert "0000000200-0000000299: ok," in text and "\x1b[" in drawn  # drawn, not printed
