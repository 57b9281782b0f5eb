"""The plan is what happens: tokens after truncation with the provider's tokenizer, answers in the cache
left out, requests made with every per-request limit, `--limit` over the whole run, and a plan before
`migrate`. Checked against what the loopback server was actually sent."""

from __future__ import annotations

import sqlite3

from backfill_pipeline.cli import main
from backfill_pipeline.config import load_config
from backfill_pipeline.plan import plan_dataset
from backfill_pipeline.stores import open_store

from .conftest import query, write_config
from .graph_helpers import register, run_partition
from .test_provider_graph import provider_config, setup

EMBEDDED_HERE = "SELECT count(*) FROM job_postings WHERE embedding_model = 'text-embedding-3-small'"


def test_the_plan_matches_what_is_sent(demo_db, tmp_path, monkeypatch, server, instance) -> None:
    with sqlite3.connect(demo_db) as conn:  # one posting far past the model's 8,192-token input limit
        conn.execute("UPDATE job_postings SET description = ? WHERE id = 7", ["Python SQL Kafka " * 4000])
    data = provider_config(demo_db, server)
    data["datasets"]["jobs"]["enrichment"]["enabled"] = False
    data["datasets"]["jobs"]["embedding"]["batch_size"] = 16
    _, config = setup(tmp_path, data, monkeypatch)
    dataset = config.datasets["jobs"]
    key = register(config, "jobs", instance)[0]

    plan = plan_dataset("jobs", dataset, keys=[key])
    assert plan.embedding.truncated == 1 and not plan.missing
    run_partition(config, "jobs", key, instance)
    sent = [(inputs, tokens) for route, inputs, tokens in server.stats.inputs_per_request if route == "embeddings"]
    assert plan.embedding.requests == len(sent)  # one probe-free run: the same batches
    assert plan.embedding.to_pay == sum(n for n, _ in sent)
    assert abs(plan.embedding.tokens - sum(t for _, t in sent)) <= 0.1 * sum(t for _, t in sent)

    again = plan_dataset("jobs", dataset, keys=[key], force=True)  # everything is in the cache now
    assert again.embedding.cached == again.embedding.distinct > 0
    assert again.embedding.tokens == 0 and again.embedding.requests == 0 and again.cost == 0


def test_a_plan_before_migrate_and_a_limit_over_the_whole_run(demo_db, tmp_path, monkeypatch, server, instance) -> None:
    data = provider_config(demo_db, server)
    data["datasets"]["jobs"]["enrichment"]["enabled"] = False
    dataset = load_config(write_config(tmp_path, data)).datasets["jobs"]
    early = plan_dataset("jobs", dataset)  # the demo file is not migrated yet
    assert "job_postings.enrichment_hash" in early.missing or "backfill_failures (table)" in early.missing
    assert early.embedding.rows > 0 and "not migrated yet" in "\n".join(early.lines())

    _, config = setup(tmp_path, data, monkeypatch)  # migrates
    keys = register(config, "jobs", instance)
    limited = plan_dataset("jobs", config.datasets["jobs"], limit=150)
    assert sum(limited.work_by_partition.values()) == 150 and len(limited.work_by_partition) >= 2

    monkeypatch.setenv("DAGSTER_HOME", str(instance.root_directory))
    before = query(demo_db, EMBEDDED_HERE)[0][0]
    assert main(["materialize", "--yes", "--limit", "150"]) == 0
    assert query(demo_db, EMBEDDED_HERE)[0][0] - before == 150  # the whole run, not each partition
    assert len(keys) > len([k for k, n in limited.work_by_partition.items() if n])


def test_a_plan_reads_a_redis_cache_over_several_partitions(demo_db, tmp_path) -> None:
    """Each partition's look-up opens the cache in its own event loop (a Redis client belongs to one)."""
    import uuid

    data = provider_config(demo_db, _NoServer())
    jobs = data["datasets"]["jobs"]
    jobs["enrichment"]["enabled"] = False
    jobs["cache"] = {
        "backend": "redis",
        "redis_url": "redis://127.0.0.1:6379/0",
        "key_prefix": f"backfill-test-{uuid.uuid4().hex}:",  # only read, never written
    }
    dataset = load_config(write_config(tmp_path, data)).datasets["jobs"]
    with open_store("jobs", dataset) as store:
        store.migrate()  # the cache is read once the pipeline's tables exist
    plan = plan_dataset("jobs", dataset)
    assert len(plan.work_by_partition) >= 3 and plan.embedding.requests >= 3


class _NoServer:
    openai_url = gemini_url = "http://127.0.0.1:9/v1"  # a plan calls no provider
