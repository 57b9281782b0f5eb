"""mode: batch through the Dagster graph against the loopback server's batch APIs (OpenAI files and batches,
Gemini batch mode), with the official SDKs: answers, partial failures, accounting at the batch price,
expiry and cancellation, and a run killed while its batch is pending that resumes without resubmitting."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backfill_pipeline.engine import embed_texts
from backfill_pipeline.engine.batch_stage import BatchJournal
from backfill_pipeline.policy import build_policy
from backfill_pipeline.providers import build_embedding_provider
from backfill_pipeline.stores import open_store

from .conftest import REPO, query, subprocess_env
from .fake_providers import GEMINI_KEY, OPENAI_KEY, FakeProviderServer
from .graph_helpers import metadata, register, run_partition
from .test_provider_graph import provider_config, setup

FAST_BATCH = {"poll_seconds": 0.1, "wait_minutes": 2}


def batch_config(demo_db: Path, server: FakeProviderServer, provider: str = "openai", **batch: object) -> dict:
    data = provider_config(demo_db, server, provider)
    jobs = data["datasets"]["jobs"]
    for stage in ("embedding", "enrichment"):
        jobs[stage].update(mode="batch", batch={**FAST_BATCH, **batch})
    return data


def _covered(demo_db: Path, below: int = 100) -> tuple[int, int]:
    with_text = query(demo_db, f"SELECT count(*) FROM job_postings WHERE id < {below} AND description != ''")[0][0]
    done = query(
        demo_db,
        f"SELECT count(*) FROM job_postings WHERE id < {below} AND description != '' "
        "AND json_array_length(embedding) = 768 AND summary IS NOT NULL",
    )[0][0]
    return done, with_text


def _mark(demo_db: Path, marker: str, ids: tuple[int, ...]) -> None:
    conn = sqlite3.connect(demo_db)
    conn.execute(
        f"UPDATE job_postings SET description = description || ' {marker}' WHERE id IN ({', '.join(map(str, ids))})"
    )
    conn.commit()
    conn.close()


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_a_partition_in_batch_mode_is_answered_once_at_the_batch_price(
    demo_db, tmp_path, monkeypatch, server, instance, provider
) -> None:
    _mark(demo_db, "FAULT:400", (7,))
    _, config = setup(tmp_path, batch_config(demo_db, server, provider), monkeypatch)
    key = register(config, "jobs", instance)[0]
    result = run_partition(config, "jobs", key, instance)
    enrich, embed = metadata(result, "llm_enrichment"), metadata(result, "embeddings")

    # nothing went to the realtime routes; one batch per stage
    assert server.count("chat") == 0 and server.count("embeddings") == 0
    assert len(server.batches.created) == 2
    done, with_text = _covered(demo_db)
    # row 7's request lines failed in the batch, each alone
    assert done == with_text - 1 and enrich["rows_failed"] == 1 and embed["rows_failed"] == 1
    failures = query(demo_db, "SELECT row_id, stage, error_class, message FROM backfill_failures ORDER BY stage")
    assert [f[:3] for f in failures] == [("7", "embedding", "permanent"), ("7", "enrichment", "permanent")]
    assert all("forbidden token" in f[3] for f in failures)  # the provider's words
    assert (
        server.answered("batch_chat") == enrich["rows_in"] and server.answered("batch_embeddings") == embed["rows_in"]
    )
    if provider == "openai":  # half the configured price: the batch discount
        expected = embed["provider_input_tokens"] / 1e6 * 0.02 * 0.5
        assert embed["provider_cost_usd"] == pytest.approx(expected, abs=1e-6) and expected > 0
        assert enrich["provider_requests"] == enrich["rows_in"]
        assert embed["provider_requests"] == embed["rows_in"]  # one input per line: a refused one fails alone
    # the answers are in the cache: a forced redo pays again only for what never got a usable answer
    again = run_partition(config, "jobs", key, instance, force=True)
    assert server.repeated_texts("batch_embeddings") == 1 and server.repeated_texts("batch_chat") == 1  # row 7
    assert metadata(again, "embeddings")["provider_cache_hits"] == metadata(again, "embeddings")["rows_in"] - 1


@pytest.mark.parametrize("outcome", ["expired", "cancelled"])
def test_an_expired_or_cancelled_batch_keeps_what_completed_and_requeues_the_rest(
    demo_db, tmp_path, monkeypatch, server, instance, outcome
) -> None:
    data = batch_config(demo_db, server)
    data["datasets"]["jobs"]["enrichment"]["enabled"] = False
    _, config = setup(tmp_path, data, monkeypatch)
    server.batches.behaviour.outcome = outcome
    key = register(config, "jobs", instance)[0]
    first = metadata(run_partition(config, "jobs", key, instance), "embeddings")
    answered = server.answered("batch_embeddings")
    assert 0 < first["rows_embedded"] == answered < first["rows_in"]
    assert first["rows_unsent"] == first["rows_in"] - answered and first["rows_failed"] == 0
    assert query(demo_db, "SELECT count(*) FROM backfill_failures")[0][0] == 0  # re-queued, not failed
    assert query(demo_db, "SELECT state FROM backfill_batches")[0][0] == "done"

    server.batches.behaviour.outcome = "completed"
    second = metadata(run_partition(config, "jobs", key, instance), "embeddings")
    assert second["rows_in"] == first["rows_unsent"] and second["rows_embedded"] == second["rows_in"]
    assert len(server.batches.created) == 2 and server.repeated_texts("batch_embeddings") == 0


def test_a_run_killed_while_its_batch_is_pending_resumes_it_without_resubmitting(
    demo_db, tmp_path, monkeypatch, server, instance
) -> None:
    data = batch_config(demo_db, server)
    data["datasets"]["jobs"]["enrichment"]["enabled"] = False
    data["datasets"]["jobs"]["lease_seconds"] = 3  # the killed run's lease lapses quickly
    path, config = setup(tmp_path, data, monkeypatch)
    server.batches.behaviour.delay_seconds = 3600  # pending until the test says otherwise
    key = register(config, "jobs", instance)[0]
    env = subprocess_env(
        BACKFILL_CONFIG=str(path),
        OPENAI_API_KEY=OPENAI_KEY,
        GEMINI_API_KEY=GEMINI_KEY,
        DAGSTER_HOME=instance.root_directory,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "backfill_pipeline_tests.run_partition_script", "jobs", key],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not query(demo_db, "SELECT 1 FROM backfill_batches WHERE batch_id IS NOT NULL"):
        assert worker.poll() is None, worker.communicate()
        time.sleep(0.2)
    time.sleep(0.5)  # polling the pending batch
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    [(batch_id, state)] = query(demo_db, "SELECT batch_id, state FROM backfill_batches")
    assert state == "submitted" and server.batches.created == [batch_id]
    assert server.answered("batch_embeddings") == 0

    server.batches.batches[batch_id].delay = 0.0  # the provider finishes it while nothing runs
    time.sleep(3)  # the killed run's lease lapses
    resumed = run_partition(config, "jobs", key, instance)
    embed = metadata(resumed, "embeddings")
    assert server.batches.created == [batch_id]  # polled again, never submitted twice
    assert embed["rows_embedded"] == embed["rows_in"] > 0 and server.repeated_texts("batch_embeddings") == 0
    logs = "\n".join(str(r) for r in instance.all_logs(resumed.run_id))
    assert f"resuming batch {batch_id}" in logs


def test_the_plan_shows_both_prices_and_the_batch_limits(demo_db, tmp_path, monkeypatch, server, capsys) -> None:
    from backfill_pipeline.cli import main

    setup(tmp_path, batch_config(demo_db, server), monkeypatch)
    assert main(["plan", "--json"]) == 0
    [plan] = json.loads(capsys.readouterr().out)
    realtime, batch = plan["estimated_cost_realtime_usd"], plan["estimated_cost_batch_usd"]
    assert realtime > 0 and batch == pytest.approx(realtime / 2, abs=1e-6) and plan["estimated_cost_usd"] == batch
    batches = plan["embedding"]["batches"]  # one per partition holding work: the demo's 30 partitions at most
    assert plan["embedding"]["mode"] == "batch" and 1 <= batches <= 30
    assert plan["embedding"]["requests"] == plan["embedding"]["distinct"] - plan["embedding"]["cached"]
    assert main(["plan"]) == 0
    text = capsys.readouterr().out
    assert f"realtime ${realtime:.4f}, batch ${batch:.4f}" in text
    assert f"embedding batches: {batches} (OpenAI Batch API: at most 50,000 requests, 50,000 inputs" in text
    assert server.count("batches") == 0 and not server.batches.created  # a dry run submits nothing


def test_after_a_stop_nothing_new_is_submitted(demo_db, tmp_path, monkeypatch, server) -> None:
    """A step that begins its window after Ctrl+C takes what is cached and submits no batch."""
    _, config = setup(tmp_path, batch_config(demo_db, server), monkeypatch)
    dataset = config.datasets["jobs"]
    with open_store("jobs", dataset) as store:
        policy = build_policy(dataset, dataset.embedding, store.ledger)
        policy.batches = BatchJournal(
            store.ledger, "0000000000-0000000999", "embedding", dataset.embedding.batch, print
        )
        policy.stop = lambda: True
        provider = build_embedding_provider(dataset.embedding, OPENAI_KEY)
        outcome = asyncio.run(embed_texts(provider, ["one posting", "another posting"], batch_size=8, policy=policy))
    assert outcome.unsent == [0, 1] and not outcome.failures
    assert len(server.batches.created) == 0 and server.count("embeddings") == 0
