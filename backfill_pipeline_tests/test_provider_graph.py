"""Real providers (over loopback HTTP) through the Dagster graph: config switches, cache, failures,
shared budgets across processes, crash recovery, Redis."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest

from backfill_pipeline.config import load_config
from backfill_pipeline.lib import backfill_definitions
from backfill_pipeline.stores import open_store

from .conftest import REPO, demo_config_dict, query, subprocess_env, write_config
from .fake_providers import GEMINI_KEY, OPENAI_KEY, FakeProviderServer, Fault, ModelLimits
from .graph_helpers import metadata, register, run_partition
from .pg import unavailable

FAST = {"rate_limit_base_seconds": 0.05, "transient_base_seconds": 0.05, "max_attempts": 3}


def provider_config(demo_db: Path, server: FakeProviderServer, provider: str = "openai", **dataset) -> dict:
    data = demo_config_dict(demo_db)
    jobs = data["datasets"]["jobs"]
    if provider == "openai":
        jobs["embedding"] = {
            "provider": "openai",
            "model": "text-embedding-3-small",
            "dimension": 768,
            "base_url": server.openai_url,
            "retry": FAST,
            "price_per_million_input_tokens": 0.02,
        }
        jobs["enrichment"] = {
            "enabled": True,
            "provider": "openai",
            "model": "gpt-4o-mini",
            "base_url": server.openai_url,
            "retry": FAST,
            "max_in_flight": 16,
            "price_per_million_input_tokens": 0.15,
            "price_per_million_output_tokens": 0.6,
        }
    else:
        jobs["embedding"] = {
            "provider": "gemini",
            "model": "gemini-embedding-001",
            "dimension": 768,
            "task_type": "RETRIEVAL_DOCUMENT",
            "base_url": server.gemini_url,
            "retry": FAST,
        }
        jobs["enrichment"] = {
            "enabled": True,
            "provider": "gemini",
            "model": "gemini-2.0-flash",
            "base_url": server.gemini_url,
            "retry": FAST,
            "max_in_flight": 16,
        }
    jobs.update(dataset)
    return data


def setup(tmp_path: Path, data: dict, monkeypatch) -> tuple:
    path = write_config(tmp_path, data)
    monkeypatch.setenv("BACKFILL_CONFIG", str(path))
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("GEMINI_API_KEY", GEMINI_KEY)
    config = load_config(path)
    with open_store("jobs", config.datasets["jobs"]) as store:
        store.migrate()
    return path, config


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_switching_provider_by_config_alone(demo_db, tmp_path, monkeypatch, server, instance, provider) -> None:
    _, config = setup(tmp_path, provider_config(demo_db, server, provider), monkeypatch)
    key = register(config, "jobs", instance)[0]
    result = run_partition(config, "jobs", key, instance, force=True)  # every row with text, paid once
    enrich, embed = metadata(result, "llm_enrichment"), metadata(result, "embeddings")
    assert enrich["rows_in"] == server.count("chat", 200)  # one answered request per row
    assert enrich["provider_requests"] == enrich["rows_in"] + enrich["provider_retries"]
    # every row needing a vector needed enrichment too: its embedding went ahead during the enrichment, and
    # the embeddings step found it in the cache
    assert enrich["embedding_ahead_inputs"] == enrich["embedding_ahead_rows"] == embed["rows_in"] > 0
    assert enrich["embedding_ahead_requests"] == server.count("embeddings", 200)
    assert embed["provider_requests"] == 0 and embed["provider_cache_hits"] == embed["rows_in"]
    if provider == "openai":
        ahead_tokens = enrich["embedding_ahead_input_tokens"]
        assert enrich["embedding_ahead_cost_usd"] == pytest.approx(ahead_tokens / 1e6 * 0.02, abs=1e-6)
        assert enrich["provider_output_tokens"] > 0 and enrich["provider_cost_usd"] > 0
    rows = query(
        demo_db,
        "SELECT count(*) FROM job_postings WHERE id < 100 AND description != '' "
        "AND json_array_length(embedding) = 768 AND summary IS NOT NULL",
    )
    assert rows[0][0] == query(demo_db, "SELECT count(*) FROM job_postings WHERE id < 100 AND description != ''")[0][0]

    # paid answers are cached in the database: a second forced redo pays nothing
    before = (server.count("chat"), server.count("embeddings"))
    again = run_partition(config, "jobs", key, instance, force=True)
    assert (server.count("chat"), server.count("embeddings")) == before
    assert metadata(again, "llm_enrichment")["provider_cache_hits"] == metadata(again, "llm_enrichment")["rows_in"]
    assert metadata(again, "embeddings")["provider_cache_hits"] == metadata(again, "embeddings")["rows_in"]
    assert metadata(again, "llm_enrichment")["embedding_ahead_rows"] == 0  # found in the cache, not paid


def test_embeddings_that_fail_ahead_are_left_to_the_embeddings_step(
    demo_db, tmp_path, monkeypatch, server, instance
) -> None:
    """Ahead is an optimisation: a request that fails there (every attempt answered 503) is not cached, and
    the embeddings step pays for its rows as it always would; every row is still written."""
    _, config = setup(tmp_path, provider_config(demo_db, server), monkeypatch)
    server.inject("embeddings", Fault("503", times=FAST["max_attempts"]))  # the ahead request's attempts
    result = run_partition(config, "jobs", register(config, "jobs", instance)[0], instance, force=True)
    assert result.success
    enrich, embed = metadata(result, "llm_enrichment"), metadata(result, "embeddings")
    assert enrich["embedding_ahead_rows"] == 0 and enrich["embedding_ahead_requests"] == FAST["max_attempts"]
    assert embed["provider_inputs"] == embed["rows_embedded"] == embed["rows_in"] > 0
    assert embed["provider_cache_hits"] == 0 and server.count("embeddings", 503) == FAST["max_attempts"]
    assert metadata(result, "written_table")["rows_written"] == embed["rows_in"]


def test_an_embedding_key_refused_ahead_is_masked_and_named_by_the_embeddings_step(
    demo_db, tmp_path, monkeypatch, server, instance
) -> None:
    """The chat key works, the embedding key is refused: sending ahead stops with a masked warning, the
    enrichment is kept, and the embeddings step fails with the error that names the key."""
    data = provider_config(demo_db, server)
    data["datasets"]["jobs"]["embedding"]["api_key_env"] = "EMBEDDING_KEY"
    wrong = "sk-proj-WRONGembed7f3a9c1e5b2dXqZj"  # a tail of letters: digits occur in timestamps
    _, config = setup(tmp_path, data, monkeypatch)
    monkeypatch.setenv("EMBEDDING_KEY", wrong)
    key = register(config, "jobs", instance)[0]
    job = backfill_definitions(config).resolve_job_def("jobs_backfill_job")
    result = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False)
    assert not result.success
    assert metadata(result, "llm_enrichment")["rows_enriched"] > 0 and server.count("embeddings", 200) == 0
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "jobs__embeddings" and "Incorrect API key provided: ***" in str(failure)
    logged = "\n".join(str(r) for r in instance.all_logs(result.run_id))
    assert "embeddings ahead of enrichment stopped" in logged
    for fragment in (wrong, wrong[:8], wrong[-4:], "WRONGembed"):
        assert fragment not in logged


def test_embeddings_wait_for_the_enrichment_they_include(demo_db, tmp_path, monkeypatch, server, instance) -> None:
    """The control: a text that includes the enrichment cannot go ahead; the embeddings step pays for it."""
    data = provider_config(demo_db, server)
    data["datasets"]["jobs"]["embedding"]["include_enrichment"] = True
    _, config = setup(tmp_path, data, monkeypatch)
    result = run_partition(config, "jobs", register(config, "jobs", instance)[0], instance, force=True)
    enrich, embed = metadata(result, "llm_enrichment"), metadata(result, "embeddings")
    assert "embedding_ahead_requests" not in enrich
    assert embed["provider_inputs"] == embed["rows_in"] > 0 and embed["provider_cache_hits"] == 0
    assert embed["provider_requests"] == server.count("embeddings", 200)


def test_failed_rows_are_recorded_cool_down_and_requeue(
    demo_db, tmp_path, monkeypatch, server, instance, capsys
) -> None:
    conn = sqlite3.connect(demo_db)
    conn.execute("UPDATE job_postings SET description = description || ' FAULT:schema' WHERE id IN (3, 4, 5)")
    conn.commit()
    conn.close()
    _, config = setup(tmp_path, provider_config(demo_db, server), monkeypatch)
    key = register(config, "jobs", instance)[0]
    first = run_partition(config, "jobs", key, instance)
    assert metadata(first, "written_table")["rows_enrichment_failed"] == 3
    failures = query(
        demo_db, "SELECT row_id, stage, error_class, attempts, message FROM backfill_failures ORDER BY row_id"
    )
    assert [(f[0], f[1], f[2], f[3]) for f in failures] == [
        (str(i), "enrichment", "invalid_output", 1) for i in (3, 4, 5)
    ]
    assert "seniority" in failures[0][4]
    asked = server.count("chat")

    cooling = run_partition(config, "jobs", key, instance)
    assert metadata(cooling, "detected_placeholders")["rows_failed_cooling_down"] == 3
    assert server.count("chat") == asked  # nothing asked again during the cool-down

    # the operator's view: the failures command lists them with their error; requeue makes one eligible now
    listing = _cli(capsys, "failures")
    assert all(f" {i} " in listing for i in (3, 4, 5)) and "invalid_output" in listing and "enrichment" in listing
    assert "1 failed rows re-queued" in _cli(capsys, "requeue", "--ids", "4")
    assert metadata(run_partition(config, "jobs", key, instance), "llm_enrichment")["rows_in"] == 1

    requeued = run_partition(config, "jobs", key, instance, requeue_failed=True)
    assert metadata(requeued, "llm_enrichment")["rows_in"] == 3 and server.count("chat") == asked + 1 + 3
    assert [r[0] for r in query(demo_db, "SELECT attempts FROM backfill_failures ORDER BY row_id")] == [2, 3, 2]


def _cli(capsys, *args: str) -> str:
    from backfill_pipeline.cli import main

    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


def test_secrets_never_reach_logs_or_metadata(demo_db, tmp_path, monkeypatch, server, instance) -> None:
    _, config = setup(tmp_path, provider_config(demo_db, server), monkeypatch)
    key = register(config, "jobs", instance)[0]
    result = run_partition(config, "jobs", key, instance)
    records = instance.all_logs(result.run_id)
    text = "\n".join(str(r) for r in records)
    assert "llm_enrichment" in text or "jobs__llm_enrichment" in text
    assert OPENAI_KEY not in text and OPENAI_KEY[:12] not in text


def test_a_refused_key_is_masked_where_the_error_is_shown(demo_db, tmp_path, monkeypatch, server, instance) -> None:
    """OpenAI's 401 quotes the start and end of the key sent; none of it reaches a log or a failure."""
    _, config = setup(tmp_path, provider_config(demo_db, server), monkeypatch)
    wrong = "sk-proj-WRONGkey7f3a9c1e5b2dXqZj"  # a tail of letters: digits occur in timestamps
    monkeypatch.setenv("OPENAI_API_KEY", wrong)
    key = register(config, "jobs", instance)[0]
    result = (
        backfill_definitions(config)
        .resolve_job_def("jobs_backfill_job")
        .execute_in_process(partition_key=key, instance=instance, raise_on_error=False)
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "Incorrect API key provided: ***" in failure.event_specific_data.error.message
    logged = "\n".join(str(r) for r in instance.all_logs(result.run_id))
    for fragment in (wrong, wrong[:8], wrong[-4:], "WRONGkey"):
        assert fragment not in logged
    assert server.count("chat", 200) == 0 and server.count("embeddings", 200) == 0


def test_missing_key_fails_the_step_clearly_without_calls(demo_db, tmp_path, monkeypatch, server, instance) -> None:
    _, config = setup(tmp_path, provider_config(demo_db, server), monkeypatch)
    monkeypatch.setenv("OPENAI_API_KEY", "")
    key = register(config, "jobs", instance)[0]
    job = backfill_definitions(config).resolve_job_def("jobs_backfill_job")
    with pytest.raises(Exception) as info:
        job.execute_in_process(partition_key=key, instance=instance)
    assert "no OpenAI API key" in str(info.value) or "OPENAI_API_KEY" in str(info.value)
    assert server.count("chat") == 0 and server.count("embeddings") == 0


def _spawn(key: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "backfill_pipeline_tests.run_partition_script", "jobs", key],
        cwd=REPO,
        env=subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _two_partitions_at_once(demo_db, tmp_path, monkeypatch, server, backend: str) -> FakeProviderServer:
    limiter = {"backend": backend, "burst_seconds": 0.5}
    if backend == "redis":
        limiter["redis_url"] = "redis://127.0.0.1:6379/0"
    data = provider_config(demo_db, server, rate_limiter=limiter)
    data["datasets"]["jobs"]["embedding"] = {"provider": "offline", "dimension": 768}
    data["datasets"]["jobs"]["enrichment"]["rate_limit"] = {"requests_per_minute": 1200}
    data["datasets"]["jobs"]["enrichment"]["retry"] = {
        "rate_limit_base_seconds": 0.2,
        "transient_base_seconds": 0.1,
        "max_attempts": 8,
    }
    server.limits["gpt-4o-mini"] = ModelLimits(requests_per_minute=1200, burst_seconds=1.0)
    path, config = setup(tmp_path, data, monkeypatch)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"BACKFILL_CONFIG": str(path), "DAGSTER_HOME": str(home), "OPENAI_API_KEY": OPENAI_KEY}
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    keys = register(config, "jobs", dg.DagsterInstance.get())
    procs = [_spawn(k, env) for k in keys[:2]]
    outs = [p.communicate(timeout=240) for p in procs]
    for out, err in outs:
        assert json.loads(out.strip().splitlines()[-1])["success"], err[-2000:]
    return server


@pytest.mark.parametrize("backend", ["database", "redis"])
def test_budget_holds_across_processes(demo_db, tmp_path, monkeypatch, server, backend) -> None:
    _two_partitions_at_once(demo_db, tmp_path, monkeypatch, server, backend)
    accepted = sorted(t for t, route, *_ in server.stats.accepted_at if route == "chat")
    assert len(accepted) > 100
    assert server.count("chat", 429) <= 2  # the server's own count
    # in any 1-second window at most rate * 1s + rate * burst + 1 requests (GCRA): 20 + 10 + 1, both processes.
    # The budget spaces the reservations; the server sees arrivals, which a busy 2-core machine can delay by
    # a scheduling slice and bunch: allow 0.25 s of that transit jitter (5 requests at 20/s), no more.
    for i, t in enumerate(accepted):
        window = [u for u in accepted[i : i + 60] if u - t < 1.0]
        assert len(window) <= 20 + 10 + 1 + 5


def test_without_a_shared_budget_the_server_pushes_back(demo_db, tmp_path, monkeypatch, server) -> None:
    """The control: each process with its own budget overshoots, and the server answers 429."""
    _two_partitions_at_once(demo_db, tmp_path, monkeypatch, server, "local")
    assert server.count("chat", 429) > 5


def _one_slow_partition(demo_db, tmp_path, monkeypatch, server) -> tuple[Path, Path, dg.DagsterInstance, str]:
    """The demo as one partition, a chat model slow enough to kill mid-enrichment, leases of 3 s, and a
    Dagster home of its own: (config path, home, instance, partition key)."""
    data = provider_config(demo_db, server)
    data["datasets"]["jobs"]["partitioning"]["width"] = 1000
    data["datasets"]["jobs"]["enrichment"]["max_in_flight"] = 4
    data["datasets"]["jobs"]["lease_seconds"] = 3
    data["datasets"]["jobs"].setdefault("cache", {})["claim_seconds"] = 3  # the killed run's claims lapse soon
    server.limits["gpt-4o-mini"] = ModelLimits(latency_seconds=0.05)
    path, config = setup(tmp_path, data, monkeypatch)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = dg.DagsterInstance.get()
    key = register(config, "jobs", instance)[0]
    return path, home, instance, key


def test_killed_partition_pays_at_most_in_flight_again(demo_db, tmp_path, monkeypatch, server) -> None:
    path, home, instance, key = _one_slow_partition(demo_db, tmp_path, monkeypatch, server)
    env = {"BACKFILL_CONFIG": str(path), "DAGSTER_HOME": str(home), "OPENAI_API_KEY": OPENAI_KEY}
    proc = _spawn(key, env)
    deadline = time.time() + 120
    while server.count("chat", 200) < 60 and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    answered_before = server.answered("chat")
    assert 60 <= answered_before < 250, "the kill was meant to land mid-enrichment"
    # no manual step: the killed run stays STARTED in the instance, but it no longer renews its lease
    assert [r.dagster_run.is_finished for r in instance.get_run_records()] == [False]
    time.sleep(3.5)

    outcome = json.loads(_spawn(key, env).communicate(timeout=240)[0].strip().splitlines()[-1])
    assert outcome["success"], outcome["errors"]
    assert outcome["assets"]["llm_enrichment"]["provider_cache_hits"] >= answered_before - 4
    assert server.repeated_texts("chat") <= 4  # at most the requests that were in flight when killed
    assert query(demo_db, "SELECT count(*) FROM job_postings WHERE description != '' AND summary IS NULL")[0][0] == 0


def test_redis_cache_with_ttl(demo_db, tmp_path, monkeypatch, server, instance) -> None:
    """Hermetic: the cache keys carry this test's own prefix, so an empty Redis or one that another run
    left keys in gives the same result, and every key made here is deleted."""
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        client.ping()
    except redis.ConnectionError:
        unavailable("no Redis on 127.0.0.1:6379")
    prefix = f"backfill-test-{uuid.uuid4().hex}:"
    cache = {"backend": "redis", "redis_url": "redis://127.0.0.1:6379/0", "ttl_days": 30, "key_prefix": prefix}
    _, config = setup(tmp_path, provider_config(demo_db, server, cache=cache), monkeypatch)
    key = register(config, "jobs", instance)[0]
    try:
        first = run_partition(config, "jobs", key, instance, force=True)  # pays for every row with text
        paid = {"chat": server.count("chat"), "embeddings": server.count("embeddings")}
        keys = client.keys(f"{prefix}*")
        embedded, enriched = metadata(first, "embeddings"), metadata(first, "llm_enrichment")
        # the embeddings went ahead during the enrichment (into this cache): the embeddings step paid for none
        assert embedded["provider_cache_hits"] == enriched["embedding_ahead_rows"] == embedded["rows_embedded"]
        assert embedded["provider_requests"] == 0 and paid["chat"] > 0 and paid["embeddings"] > 0
        assert len(keys) == 2 * _distinct_texts(demo_db)  # one embedding and one enrichment per distinct text
        assert 29 * 86400 < client.ttl(keys[0]) <= 30 * 86400

        again = run_partition(config, "jobs", key, instance, force=True)  # everything is in the cache
        assert {"chat": server.count("chat"), "embeddings": server.count("embeddings")} == paid
        assert metadata(again, "embeddings")["provider_cache_hits"] == embedded["rows_embedded"]
        assert metadata(again, "llm_enrichment")["provider_cache_hits"] == enriched["rows_enriched"]
    finally:
        made = client.keys(f"{prefix}*")
        if made:
            client.delete(*made)


def _distinct_texts(db: Path) -> int:
    """Distinct texts among the first partition's rows with text: identical texts are paid for once."""
    sql = "SELECT DISTINCT title, company, description FROM job_postings WHERE id < 100 AND trim(description) != ''"
    return len(query(db, sql))


def test_a_killed_cli_run_is_marked_failed_and_its_partition_taken_over(demo_db, tmp_path, monkeypatch, server) -> None:
    """`backfill-pipeline materialize` killed with SIGKILL mid-partition: nothing is left STARTED or stuck.
    The next command marks the dead run failed and, once the lease has expired, finishes the partition."""
    path, home, instance, key = _one_slow_partition(demo_db, tmp_path, monkeypatch, server)
    env = subprocess_env(BACKFILL_CONFIG=str(path), DAGSTER_HOME=str(home), OPENAI_API_KEY=OPENAI_KEY)
    command = [str(Path(sys.executable).parent / "backfill-pipeline"), "materialize", "--partition", key, "--yes"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while server.count("chat", 200) < 40 and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    [killed] = instance.get_run_records()
    assert killed.dagster_run.status == dg.DagsterRunStatus.STARTED  # nobody else would ever finish it

    time.sleep(3.5)  # the killed run's lease expires
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert f"run {killed.dagster_run.run_id[:8]} was left unfinished by a process that is gone" in again.stdout
    assert f"{key}: ok," in again.stdout
    assert instance.get_run_by_id(killed.dagster_run.run_id).status == dg.DagsterRunStatus.FAILURE
    assert query(demo_db, "SELECT count(*) FROM job_postings WHERE description != '' AND summary IS NULL")[0][0] == 0
