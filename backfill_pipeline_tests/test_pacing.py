"""Pacing at a provider's limit: the server's meter, the limits and burst its headers announce, large requests."""

from __future__ import annotations

import asyncio
import time

import pytest

from backfill_pipeline.config import RateLimitSpec
from backfill_pipeline.engine import CallPolicy
from backfill_pipeline.providers.openai_provider import (
    OpenAIEmbeddingProvider,
    estimated_by_characters,
    tokenizer,
    truncate_by_tokens,
)
from backfill_pipeline.ratelimit import LocalBudget, RateLimiter, RateSignals

from .fake_providers import ModelLimits
from .test_providers_http import FAST_RETRY, _embed, openai_embedder, run, server  # noqa: F401 - fixture

EMBED = "text-embedding-3-small"


def _timed(limiter: RateLimiter, costs: list[int]) -> list[float]:
    async def go() -> list[float]:
        started, at = time.monotonic(), []
        for tokens in costs:
            await limiter.acquire(tokens)
            at.append(time.monotonic() - started)
        return at

    return asyncio.run(go())


def test_a_request_larger_than_the_burst_waits_until_the_ones_before_it_are_paid() -> None:
    """A bucket smaller than one request admits it only when full: sending it after the previous request's
    cost less the burst (1 s early here) would be answered 429."""
    limiter = RateLimiter(LocalBudget(), "big", RateLimitSpec(tokens_per_minute=6000), burst_seconds=0.4)
    at = _timed(limiter, [80, 80, 80])  # 100 tokens/s: 0.8 s each, twice the burst
    assert at[0] < 0.3  # at most the margin kept for jitter
    assert at[1] - at[0] >= 0.75 and at[2] - at[1] >= 0.75, at  # sent early, the second would leave at 0.4 s


def test_limits_and_burst_are_learned_from_the_headers() -> None:
    limiter = RateLimiter(LocalBudget(), "learn", RateLimitSpec())
    assert not limiter.enabled  # nothing configured, nothing announced yet
    limiter.on_success(RateSignals(limit_requests=600, remaining_requests=29), tokens=5)
    assert limiter.enabled and limiter.requests_per_minute == 600
    assert limiter.burst == pytest.approx(3.0)  # 29 left + this one = 3 s of 10 requests/s
    at = _timed(limiter, [5] * 35)
    assert at[28] < 0.3  # the burst the server holds is spent at once...
    assert at[34] >= 0.45  # ...then 10 requests/s
    limiter.on_rate_limited(None)
    assert limiter.burst == pytest.approx(1.5)
    limiter.on_success(RateSignals(limit_requests=600, remaining_requests=599), tokens=5)
    assert limiter.burst == pytest.approx(1.5)  # a burst refused once is not tried again


def test_the_bucket_size_is_learned_from_what_it_holds_and_the_time_until_it_is_full() -> None:
    """OpenAI's reset headers say when a bucket is full again: what it holds plus that time is its size. What
    it holds alone is a lower bound, and a run paced below the size never sees it rise to it (the 2 s bucket
    of the providers benchmark was learned as about 1.6 s, its last 0.4 s never spent)."""
    limiter = RateLimiter(LocalBudget(), "size", RateLimitSpec())
    limiter.on_success(RateSignals(limit_requests=600, remaining_requests=5, reset_requests=1.4), tokens=5)
    assert limiter.burst == pytest.approx(1.9)  # 0.5 s held + 1.4 s until full, at 10 requests/s
    bound = RateLimiter(LocalBudget(), "bound", RateLimitSpec())
    bound.on_success(RateSignals(limit_requests=600, remaining_requests=14), tokens=5)
    assert bound.burst == pytest.approx(1.5)  # no reset header: 14 left + this one


class _FloorsSeen(LocalBudget):
    """The budget, recording the floors each reservation carries (what the server's count says it lacks)."""

    def __init__(self) -> None:
        super().__init__()
        self.floors: list[tuple[float, float]] = []

    def reserve(self, key, request_seconds, token_seconds, burst_seconds, floors=(0, 0)) -> float:  # noqa: ANN001
        self.floors.append(floors)
        return super().reserve(key, request_seconds, token_seconds, burst_seconds, floors)


@pytest.mark.parametrize(("sent_ago", "floor"), [(0.8, 0.2), (None, 1.0)])
def test_what_the_server_lacks_is_dated_by_when_the_request_left(sent_ago: float | None, floor: float) -> None:
    """The server counts a request on arrival and answers a latency later: what its headers say the bucket
    lacks is that much older than the answer. Waited out from the answer, it held every run a latency (0.4 s
    in the providers benchmark) behind the pace the bucket allows."""
    budget = _FloorsSeen()
    limiter = RateLimiter(budget, "dated", RateLimitSpec(requests_per_minute=600), burst_seconds=1.0)
    sent_at = None if sent_ago is None else time.monotonic() - sent_ago
    limiter.on_success(RateSignals(limit_requests=600, remaining_requests=0), tokens=5, sent_at=sent_at)
    _timed(limiter, [5])  # its bucket of 1 s was empty when the server counted that request
    assert budget.floors[0][0] == pytest.approx(floor, abs=0.05)


def test_a_limiter_started_later_uses_the_burst_the_others_learned() -> None:
    """A run that starts while others have spent most of a large bucket (a minute, on OpenAI) does not queue
    behind their reservations as if the bucket held 1 s: the learned burst is shared through the budget
    (each backend's sharing: test_budget_and_cache)."""
    budget = LocalBudget()
    spec = RateLimitSpec(tokens_per_minute=6000)  # 100 tokens/s
    first = RateLimiter(budget, "shared", spec)
    first.on_success(RateSignals(limit_tokens=6000, remaining_tokens=2900), tokens=100)  # a 30 s bucket
    _timed(first, [100] * 20)  # 20 s of the bucket reserved at once
    later = RateLimiter(budget, "shared", spec)
    at = _timed(later, [100])
    assert later.burst == pytest.approx(30.0)
    assert at[0] < 1.0  # with its own 1 s it would wait ~20 s


def test_configured_limits_are_lowered_to_the_announced_ones_and_a_set_burst_is_kept() -> None:
    limiter = RateLimiter(LocalBudget(), "low", RateLimitSpec(tokens_per_minute=1_000_000), burst_seconds=0.5)
    limiter.on_success(RateSignals(limit_tokens=60_000, remaining_tokens=59_000), tokens=100)
    assert limiter.tokens_per_minute == 60_000
    assert limiter.burst == 0.5


def test_openai_meter_counts_characters_when_they_say_more_than_the_tokenizer() -> None:
    long_words = "notwithstanding indemnification counterclaimant " * 20
    counted = len(long_words.split()) * 3  # a few tokens a word
    assert estimated_by_characters([long_words], counted) == -(-len(long_words) // 4)
    assert estimated_by_characters(["a b c d"], 50) == 50  # never below the tokenizer's count


def _long_word_texts(n: int) -> list[str]:
    """Long words that are one token each: ~3.4 times more tokens by characters / 4 than by the tokenizer."""
    words = ["international", "responsibility", "administration", "environmental", "understanding", "relationship"]
    return [" ".join(words[(i + j) % len(words)] for j in range(60)) + f" clause {i}" for i in range(n)]


@pytest.mark.parametrize("metered", [True, False])
def test_at_a_character_metered_limit_the_server_answers_no_429(server, monkeypatch, metered) -> None:  # noqa: F811
    """A server that meters characters / 4 (as OpenAI does) at 60,000 tokens a minute with a 1 s bucket:
    metered as the server does, the budget keeps every request under the limit; counted by the tokenizer
    (the control), it runs ahead of the server's meter and is answered 429."""
    server.limits[EMBED] = ModelLimits(tokens_per_minute=60_000, burst_seconds=1.0, meter="characters")
    provider = openai_embedder(server, dimension=64)
    if not metered:  # the tokenizer's count, as the budget kept it before
        encoding = tokenizer(EMBED)
        monkeypatch.setattr(
            OpenAIEmbeddingProvider,
            "metered_tokens",
            lambda self, texts, counted: sum(map(len, encoding.encode_ordinary_batch(texts))),
        )
    texts = _long_word_texts(12)  # ~770 tokens as counted, ~2,600 as metered by characters
    limiter = RateLimiter(LocalBudget(), f"meter-{metered}", RateLimitSpec(tokens_per_minute=60_000))
    started = time.monotonic()
    outcome = run(_embed(provider, texts, batch_size=2, policy=CallPolicy(limiter=limiter, retry=FAST_RETRY)))
    elapsed = time.monotonic() - started
    assert outcome.ok.all()
    metered_total = sum(tokens for _, route, _, tokens in server.stats.accepted_at if route == "embeddings")
    if metered:
        assert server.count("embeddings", 429) == 0
        assert elapsed >= (metered_total - 1000) / 1000 * 0.9  # paced to the server's own count
    else:
        assert server.count("embeddings", 429) >= 2


def test_texts_that_cannot_reach_the_limit_are_not_tokenized_for_the_engine() -> None:
    """The engine needs exact counts only where a text could be cut; elsewhere the byte length bounds the
    count (each token holds at least one byte) and keeps requests within their token limit."""
    short, long = "short text é", "word " * 3000  # 15,000 bytes, about 3,000 tokens
    sent, counts, cut = truncate_by_tokens(EMBED, [short, long], 8191, exact=False)
    assert sent[0] == short and counts[0] == len(short.encode()) and cut == 0
    assert counts[1] == len(tokenizer(EMBED).encode_ordinary(long))  # could reach the limit: counted
    assert truncate_by_tokens(EMBED, [short], 8191)[1] == [len(tokenizer(EMBED).encode_ordinary(short))]
    words = ["x" * 20] * 1000  # 1,000 tokens of 20 bytes: past a 500-token limit only by the count
    assert truncate_by_tokens(EMBED, [" ".join(words)], 500, exact=False)[2] == 1


def _acquired(ranks: list[int], seconds: float = 2.0, in_flight: int = 8) -> list[int]:
    """Requests each run (one limiter per run, ranked) acquires from one budget of 20 requests a second,
    with ``in_flight`` callers each."""
    budget = LocalBudget()
    limiters = [
        RateLimiter(budget, "ranked", RateLimitSpec(requests_per_minute=1200), burst_seconds=0.3) for _ in ranks
    ]
    for limiter, rank in zip(limiters, ranks, strict=True):
        limiter.set_rank(rank, in_flight)
    counts = [0] * len(ranks)

    async def caller(i: int, until: float) -> None:
        while time.monotonic() < until:
            await limiters[i].acquire(1)
            counts[i] += 1

    async def go() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(caller(i, until) for i in range(len(ranks)) for _ in range(in_flight)))

    asyncio.run(go())
    return counts


def test_earlier_partitions_take_more_of_a_contended_budget() -> None:
    """The callers that start first take the burst: at equal ranks the first run gets more (the control);
    ranked behind, the same first run gets less than the one ranked ahead of it."""
    equal = _acquired([0, 0])
    assert equal[0] > equal[1], equal
    behind, ahead = _acquired([1, 0])  # the run behind waits with 4 requests at most, the other with 8
    assert ahead >= 1.2 * behind, (behind, ahead)
    ahead, behind = _acquired([0, 1])
    assert ahead >= 1.5 * behind, (ahead, behind)


def test_a_later_partition_alone_still_uses_the_whole_budget() -> None:
    """Nothing waits when the budget has room: a run ranked behind live ones that have gone quiet loses nothing."""
    [alone_first] = _acquired([0])
    [alone_ranked] = _acquired([3])  # at most one request waiting on the budget
    assert alone_ranked >= 0.9 * alone_first, (alone_ranked, alone_first)


def test_a_learned_burst_is_shared_without_waiting_for_another_request() -> None:
    """A partition's few embedding requests all leave before the first answer: the burst that answer shows
    must reach the shared budget anyway, or the next partition starts again from 1 s."""
    budget = LocalBudget()
    limiter = RateLimiter(budget, "shared-now", RateLimitSpec(tokens_per_minute=60_000))

    async def one_request() -> None:
        await limiter.acquire(500)
        limiter.on_success(RateSignals(remaining_tokens=1_500, limit_tokens=60_000), tokens=500)
        await asyncio.sleep(0.1)  # the step goes on with other work; no request follows

    asyncio.run(one_request())
    assert budget.burst("shared-now") == 2.0  # (1,500 left + the 500 just paid) / 1,000 tokens a second
    later = RateLimiter(budget, "shared-now", RateLimitSpec(tokens_per_minute=60_000))
    asyncio.run(later.acquire(100))
    assert later.burst == 2.0  # the next partition's limiter starts with it


def test_requests_that_start_together_use_the_shared_burst() -> None:
    """A new limiter's first requests all wait for its one read of the shared burst (2 s here): four 0.5 s
    requests then leave within 0.25 s; paced with the 1 s it starts from, the last would wait 0.75 s."""
    budget = LocalBudget()
    budget.set_burst("together", 2.0)
    limiter = RateLimiter(budget, "together", RateLimitSpec(tokens_per_minute=60_000))

    async def two_at_once() -> float:
        started = time.monotonic()
        await asyncio.gather(*(limiter.acquire(500) for _ in range(4)))
        return time.monotonic() - started

    assert asyncio.run(two_at_once()) < 0.5


def test_a_request_stopped_while_it_waits_gives_its_reservation_back() -> None:
    """A stop (the head start handing over to the runs, Ctrl+C) ends the requests waiting for their slots at
    once, and their reservations go back to the budget: the requests still sent are not held back by them."""
    budget = LocalBudget()
    limiter = RateLimiter(budget, "back", RateLimitSpec(requests_per_minute=600), burst_seconds=0.2)
    stopped = {"now": False}

    async def go() -> tuple[list[bool], float, float]:
        started = time.monotonic()
        waiting = [asyncio.ensure_future(limiter.acquire(1, lambda: stopped["now"])) for _ in range(20)]
        await asyncio.sleep(0.3)  # 10 requests/s: the last ones hold slots ~2 s ahead
        stopped["now"] = True
        results = await asyncio.gather(*waiting)
        ended = time.monotonic() - started
        other = RateLimiter(budget, "back", RateLimitSpec(requests_per_minute=600), burst_seconds=0.2)
        before = time.monotonic()
        await other.acquire(1)  # another run's next request: the given-back slots are free again
        return results, ended, time.monotonic() - before

    results, ended, waited = asyncio.run(go())
    assert results.count(True) in range(3, 8) and results.count(False) >= 13, results  # sent / not sent
    assert ended < 0.6  # the waiting ones noticed the stop at once, not at their slots
    assert waited < 0.3, waited  # kept spent, the 13+ unsent would delay it by ~1.5 s
