"""The engine over a provider that fails for some rows: per-row failures, batch splitting, concurrency."""

from __future__ import annotations

import asyncio

import numpy as np

from backfill_pipeline.engine import CallPolicy, embed_texts, enrich_texts
from backfill_pipeline.providers.base import EmbeddingProvider, EnrichmentProvider, ProviderError


class PickyEmbedder(EmbeddingProvider):
    """Rejects any batch holding a text with 'BAD' (as an API rejects a whole request)."""

    name, model, dimension, max_batch_size = "picky", "picky-1", 4, 8

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = self.peak = 0
        self.batch_sizes: list[int] = []

    async def embed(self, texts: list[str]) -> np.ndarray:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.batch_sizes.append(len(texts))
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        if any("BAD" in t for t in texts):
            raise ProviderError("input rejected: contains a forbidden token", "permanent")
        return np.ones((len(texts), 4), dtype=np.float32) * np.arange(1, len(texts) + 1, dtype=np.float32)[:, None]


def test_batch_rejected_as_a_whole_is_split_to_the_row_at_fault() -> None:
    texts = [f"text {i}" for i in range(40)]
    texts[13] = "BAD text"
    provider = PickyEmbedder()
    outcome = asyncio.run(embed_texts(provider, texts, batch_size=100, max_in_flight=3))
    assert [f.index for f in outcome.failures] == [13]
    assert outcome.failures[0].error_class == "permanent" and "forbidden" in outcome.failures[0].message
    assert outcome.ok.sum() == 39 and not outcome.ok[13]
    assert max(provider.batch_sizes) == 8  # the provider's own limit caps the configured batch size
    assert provider.peak <= 3


class SloppyEnricher(EnrichmentProvider):
    name, model = "sloppy", "sloppy-1"

    async def enrich(self, texts: list[str]) -> list[dict | Exception]:
        out: list[dict | Exception] = []
        for t in texts:
            if "timeout" in t:
                out.append(ProviderError("upstream timed out", "transient"))
            elif "weird" in t:
                out.append({"skills": ["Python"], "seniority": "wizard", "summary": "x"})
            else:
                out.append({"skills": ["Python", " Python "], "seniority": "Senior", "summary": "A role."})
        return out


def test_enrichment_failures_are_recorded_per_row() -> None:
    texts = ["fine", "weird answer", "fine too", "timeout please"]
    outcome = asyncio.run(enrich_texts(SloppyEnricher(), texts, batch_size=2, max_in_flight=2))
    assert [(f.index, f.error_class) for f in outcome.failures] == [(1, "invalid_output"), (3, "transient")]
    assert "seniority" in outcome.failures[0].message
    assert outcome.results[0].skills == ["Python"] and outcome.results[0].seniority == "senior"
    assert outcome.results[1] is None and outcome.results[2] is not None


def test_answers_paid_for_but_unusable_are_recorded_as_they_come() -> None:
    """A schema-violating answer was paid for and is not cached: it is handed to the recorder at once (a
    crash before the step ends must not ask again); a row the provider never answered is not."""
    seen: list[tuple[int, str]] = []

    async def recorder(failed: list) -> None:
        seen.extend((f.index, f.error_class) for f in failed)

    policy = CallPolicy(record_failures=recorder)
    texts = ["fine", "weird answer", "fine too", "timeout please"]
    outcome = asyncio.run(enrich_texts(SloppyEnricher(), texts, batch_size=2, max_in_flight=2, policy=policy))
    assert seen == [(1, "invalid_output")]
    assert [(f.index, f.recorded) for f in outcome.failures] == [(1, True), (3, False)]


def test_progress_is_reported() -> None:
    seen: list[tuple[int, int]] = []
    asyncio.run(
        embed_texts(
            PickyEmbedder(),
            [f"text {i}" for i in range(20)],
            batch_size=4,
            max_in_flight=2,
            progress=lambda d, t: seen.append((d, t)),
            progress_every=8,
        )
    )
    assert seen[-1] == (20, 20) and all(t == 20 for _, t in seen) and len(seen) >= 2


class SlowEmbedder(PickyEmbedder):
    """Each request takes ``seconds``; a stop is requested once ``stop_after`` requests were answered."""

    def __init__(self, seconds: float, stop_after: int) -> None:
        super().__init__()
        self.seconds, self.stop_after, self.answered = seconds, stop_after, 0

    async def embed(self, texts: list[str]) -> np.ndarray:
        await asyncio.sleep(self.seconds)
        self.answered += 1
        return np.ones((len(texts), 4), dtype=np.float32)


def _stopping_policy(provider: SlowEmbedder, grace: float) -> CallPolicy:
    return CallPolicy(stop=lambda: provider.answered >= provider.stop_after, stop_grace_seconds=grace)


def test_a_stop_sends_nothing_more_and_lets_requests_in_flight_finish() -> None:
    provider = SlowEmbedder(seconds=0.05, stop_after=3)
    texts = [f"text {i}" for i in range(80)]  # 10 requests of 8, 2 at a time
    outcome = asyncio.run(
        embed_texts(provider, texts, batch_size=8, max_in_flight=2, policy=_stopping_policy(provider, 5))
    )
    done = int(outcome.ok.sum())
    assert provider.answered in (3, 4)  # the request in flight at the stop finished; nothing more was sent
    assert done == 8 * provider.answered and not outcome.failures  # left unsent, not failed
    assert sorted(outcome.unsent) == [i for i in range(80) if not outcome.ok[i]] and len(outcome.unsent) == 80 - done


def test_requests_in_flight_past_the_grace_are_abandoned_unsent() -> None:
    provider = SlowEmbedder(seconds=0.0, stop_after=1)
    durations = iter([0.01, 30.0])  # the second request hangs

    async def embed(texts: list[str]) -> np.ndarray:
        await asyncio.sleep(next(durations))
        provider.answered += 1
        return np.ones((len(texts), 4), dtype=np.float32)

    provider.embed = embed  # type: ignore[method-assign]
    texts = [f"text {i}" for i in range(16)]
    policy = _stopping_policy(provider, grace=0.3)
    outcome = asyncio.run(
        asyncio.wait_for(embed_texts(provider, texts, batch_size=8, max_in_flight=2, policy=policy), 10)
    )
    assert outcome.ok.sum() == 8 and outcome.unsent == list(range(8, 16)) and not outcome.failures


def test_a_stop_belongs_to_the_run_it_was_asked_for_in() -> None:
    """In a long-lived process (a notebook), a Ctrl+C during one run does not stop the next run."""
    from backfill_pipeline import stopping

    stopping.reset()
    try:
        stopping.enter_run("run-a")
        stopping.request("Ctrl+C")
        stopping.enter_run("run-a")  # the stopped run's next step still sees it
        assert stopping.requested() and stopping.reason() == "Ctrl+C"
        stopping.enter_run("run-b")
        assert not stopping.requested()
    finally:
        stopping.reset()


def test_a_stage_ends_with_its_last_answer_not_a_poll_later() -> None:
    """Nothing is followed from another run: the stage returns as its sending ends. It used to sleep out a
    poll of ``claim_poll_seconds`` first, on every window of every stage (here it would be 30 s)."""
    import time

    provider = PickyEmbedder()
    started = time.monotonic()
    outcome = asyncio.run(
        embed_texts(provider, ["one", "two"], batch_size=8, policy=CallPolicy(claim_poll_seconds=30.0))
    )
    assert outcome.ok.all()
    assert time.monotonic() - started < 10.0


def test_paid_failures_the_database_missed_are_recorded_with_the_next_ones() -> None:
    """An unusable answer was paid for and is not cached: when recording it fails (the database away), the
    next recording takes it along, so a kill before the step's end does not pay for it again."""

    class NonFinite(PickyEmbedder):
        async def embed(self, texts: list[str]) -> np.ndarray:
            return np.full((len(texts), 4), np.nan, dtype=np.float32)

    calls: list[list[int]] = []

    async def record(failed: list) -> None:
        calls.append([f.index for f in failed])
        if len(calls) == 1:
            raise ConnectionError("the database is restarting")

    policy = CallPolicy()
    policy.record_failures = record
    outcome = asyncio.run(embed_texts(NonFinite(), ["a", "b"], batch_size=1, policy=policy, max_in_flight=1))
    assert calls == [[0], [0, 1]]
    assert [(f.index, f.error_class, f.recorded) for f in outcome.failures] == [
        (0, "invalid_output", True),
        (1, "invalid_output", True),
    ]
