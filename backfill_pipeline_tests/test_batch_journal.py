"""The batch journal on SQLite and Postgres, under the engine, against the loopback server's OpenAI Batch
API: a run killed after the provider created its batch but before the id was recorded finds the batch by
its label and polls it (nothing submitted twice); a batch recorded but never created is submitted anew;
the run ends after ``wait_minutes`` with its rows left for the next run, which resumes the same batch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from backfill_pipeline.cache import StoreCache
from backfill_pipeline.config import BatchSpec, EmbeddingSpec
from backfill_pipeline.engine import CallPolicy, embed_texts
from backfill_pipeline.engine.batch_stage import BatchJournal
from backfill_pipeline.providers.openai_provider import OpenAIEmbeddingProvider

from .fake_providers import OPENAI_KEY, FakeProviderServer
from .test_leases import migrated_opener

TEXTS = [f"posting {i}: Python and SQL, remote, {i % 7} years" for i in range(30)]


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request, tmp_path: Path):
    return migrated_opener(request.param, request, tmp_path)


def _embed(opener, server: FakeProviderServer, wait_minutes: float = 1.0, crash_after_create: bool = False, stop=None):
    """One stage run of the partition's texts in batch mode, with its own store as a step has."""
    spec = EmbeddingSpec(provider="openai", model="text-embedding-3-small", dimension=8, base_url=server.openai_url)
    with opener() as store:
        ledger = store.ledger
        if crash_after_create:  # the process dies between the provider's answer and the journal's record

            def crash(label: str, batch_id: str) -> None:
                raise KeyboardInterrupt

            ledger.batch_submitted = crash  # type: ignore[method-assign]
        journal = BatchJournal(
            ledger, "p1", "embedding", BatchSpec(poll_seconds=0.05, wait_minutes=wait_minutes), print
        )
        policy = CallPolicy(cache=StoreCache(ledger, 30), batches=journal)
        if stop is not None:
            policy.stop = stop
        provider = OpenAIEmbeddingProvider(spec, OPENAI_KEY)

        async def go():
            try:
                return await embed_texts(provider, TEXTS, batch_size=64, policy=policy)
            finally:
                await provider.aclose()

        return asyncio.run(go())


def test_a_batch_created_but_not_recorded_is_found_by_its_label(opener, server) -> None:
    with pytest.raises(KeyboardInterrupt):
        _embed(opener, server, crash_after_create=True)
    assert len(server.batches.created) == 1
    with opener() as store:
        [record] = store.ledger.open_batches("p1", "embedding")
    assert record.batch_id is None and record.state == "submitting" and len(record.lines) == len(TEXTS)

    outcome = _embed(opener, server)
    assert outcome.ok.all() and not outcome.unsent and len(server.batches.created) == 1
    assert server.answered("batch_embeddings") == len(TEXTS) and server.repeated_texts("batch_embeddings") == 0
    with opener() as store:
        assert store.ledger.open_batches("p1", "embedding") == []


def test_a_batch_recorded_but_never_created_is_submitted_anew(opener, server, monkeypatch) -> None:
    from backfill_pipeline.providers.openai_batch import OpenAIBatches

    async def no_network(self, lines, label):  # noqa: ANN001, ANN202 - the process dies before uploading
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(OpenAIBatches, "submit", no_network)
        with pytest.raises(KeyboardInterrupt):
            _embed(opener, server)
    assert server.batches.created == []
    outcome = _embed(opener, server)
    assert outcome.ok.all() and len(server.batches.created) == 1


def test_a_run_that_stops_waiting_leaves_its_rows_to_the_next_which_resumes_the_batch(opener, server) -> None:
    server.batches.behaviour.delay_seconds = 3600
    first = _embed(opener, server, wait_minutes=0.005)  # 0.3 s
    assert not first.ok.any() and len(first.unsent) == len(TEXTS) and not first.failures
    [batch_id] = server.batches.created
    server.batches.batches[batch_id].delay = 0.0
    second = _embed(opener, server)
    assert second.ok.all() and server.batches.created == [batch_id]


def test_a_batch_that_fails_as_a_whole_fails_its_rows_with_the_providers_words(opener, server) -> None:
    server.batches.behaviour.outcome = "failed"
    outcome = _embed(opener, server)
    assert not outcome.ok.any() and not outcome.unsent and len(outcome.failures) == len(TEXTS)
    assert {f.message for f in outcome.failures} == {"the batch failed: injected batch failure"}
    with opener() as store:
        assert store.ledger.open_batches("p1", "embedding") == []  # collected: not polled again


def test_ctrl_c_while_waiting_ends_the_wait_and_the_next_run_resumes_the_batch(opener, server) -> None:
    server.batches.behaviour.delay_seconds = 3600
    stopped = _embed(opener, server, stop=lambda: bool(server.batches.created))  # Ctrl+C once submitted
    assert not stopped.ok.any() and len(stopped.unsent) == len(TEXTS) and not stopped.failures
    [batch_id] = server.batches.created
    with opener() as store:
        assert [r.batch_id for r in store.ledger.open_batches("p1", "embedding")] == [batch_id]
    server.batches.batches[batch_id].delay = 0.0
    assert _embed(opener, server).ok.all() and server.batches.created == [batch_id]
