"""The one skeleton every stage runs (prepare, cache, dedupe, batch, gather), with small stage hooks.

For each stage: texts are cut to the model's limit and counted; answers already paid for come from the
cache; identical texts are sent once; the rest go in batches that respect the provider's input and token
limits, many requests in flight, each one first reserving its share of the shared rate budget. Each
answer is cached as soon as it arrives, so a crash pays again for at most the requests in flight; texts
are claimed before they are sent, so runs working at once pay for each once (:mod:`.claims`). A
stage says only how to key, send, read and keep its answers (as pgai's ``Embedder`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
from pydantic import ValidationError

from ..cache import (
    decode_answer,
    decode_vector,
    embedding_key,
    encode_answer,
    encode_vector,
    enrichment_key,
    keep_paid,
)
from ..providers.base import EmbeddingProvider, Enrichment, EnrichmentProvider, ProviderError
from ..stopping import StopRequested
from .calls import (
    CallPolicy,
    FatalProviderError,
    Progress,
    ProgressFn,
    RowFailure,
    batches,
    call_with_retries,
    error_class,
    error_message,
    finish_or_stop,
)
from .claims import Claims

R = TypeVar("R")  # one row's result: a vector, an enrichment


@dataclass(frozen=True)
class RowError:
    """A provider's answer for one row that cannot be used."""

    error_class: str
    message: str


class Stage(ABC, Generic[R]):
    """What differs between stages; :func:`run_stage` does the rest."""

    provider: EmbeddingProvider | EnrichmentProvider
    split_on: tuple[str, ...] = ()  # error classes for which a failed batch is halved to find the bad row
    max_batch_tokens: int | None = None

    @abstractmethod
    def key(self, text: str) -> str:
        """The cache key of a text as sent."""

    @abstractmethod
    def load(self, row: int, cached: bytes) -> bool:
        """Keep a cached answer for ``row``; False when it is not usable (then it is paid for again)."""

    @abstractmethod
    async def send(self, texts: list[str]) -> object: ...

    def reserve(self, tokens: int, rows: int) -> int:
        """Tokens to reserve from the rate budget for a request of ``rows`` texts and ``tokens`` tokens."""
        return tokens

    @abstractmethod
    def read(self, answer: object, rows: int) -> list[R | RowError]:
        """One result per row; raise :class:`ProviderError` when the answer as a whole is unusable."""

    @abstractmethod
    def keep(self, rows: list[int], result: R) -> None: ...

    @abstractmethod
    def encode(self, result: R) -> bytes: ...


@dataclass
class StageResult:
    failures: list[RowFailure]
    unsent: list[int]  # rows left without a result or a failure by a graceful stop: for the next run


def group_identical(keys: Sequence[str], wanted: Sequence[int]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i in wanted:
        groups.setdefault(keys[i], []).append(i)
    return groups


def _break_cycles(*helpers: Callable[..., object]) -> None:
    """The helpers of :func:`run_stage` refer to each other (and ``attempt`` to itself) through closure
    cells: a cycle that would keep the call's texts and answers alive until a full garbage collection.
    Emptying the cells that hold them lets a step working window after window hold one window's memory."""
    for helper in helpers:
        for cell in helper.__closure__ or ():
            with contextlib.suppress(ValueError):  # an empty cell
                if any(cell.cell_contents is h for h in helpers):
                    cell.cell_contents = None


async def run_stage(
    stage: Stage[R],
    texts: Sequence[str],
    *,
    batch_size: int,
    policy: CallPolicy,
    max_in_flight: int | None,
    progress: ProgressFn | None,
    progress_every: int,
) -> StageResult:
    """Run ``stage`` over ``texts``; return the failed rows and those a stop left unsent (the results are
    kept by the stage)."""
    if policy.batches is not None:  # mode: batch
        from .batch_stage import run_batch_stage

        return await run_batch_stage(
            stage, texts, batch_size=batch_size, policy=policy, progress=progress, progress_every=progress_every
        )
    provider = stage.provider
    n = len(texts)
    failures: list[RowFailure] = []
    sent, tokens, truncated = provider.prepare(list(texts), exact=False)
    provider.usage.truncated_inputs += truncated
    keys = [stage.key(t) for t in sent]
    tracker = Progress(n, progress, progress_every)

    cached = await policy.cache.get_many(sorted(set(keys)))
    done = [key in cached and stage.load(i, cached[key]) for i, key in enumerate(keys)]
    settled = list(done)
    hits = sum(done)
    provider.usage.cache_hits += hits
    tracker.add(hits)
    if policy.stop():  # stopped: the answers already paid for (here or by another run) are all it takes
        return StageResult([], [i for i in range(n) if not done[i]])
    groups = group_identical(keys, [i for i in range(n) if not done[i]])
    leaders = [members[0] for members in groups.values()]  # identical texts are paid for once
    in_flight = max_in_flight or policy.max_in_flight
    gate = asyncio.Semaphore(in_flight)
    slots = asyncio.Semaphore(in_flight)  # batches claimed at once: a killed run holds only these
    claims = Claims(policy.cache, policy.claim_seconds)
    in_order = asyncio.Lock()  # the batches' claims and cache checks, one batch's at a time (FIFO)
    elsewhere: dict[str, int] = {}  # texts another run is paying for right now
    size = min(batch_size, provider.max_batch_size)

    recorded: set[int] = set()
    unrecorded: list[RowFailure] = []  # paid failures the database was away for: recorded with the next ones

    def fail(members: list[int], error: str, message: str, attempts: int = 1) -> list[RowFailure]:
        made = [RowFailure(m, error, message, attempts) for m in members]
        failures.extend(made)
        settle(members)
        return made

    async def record(paid: list[RowFailure]) -> None:
        """Answers paid for that cannot be used are recorded at once, so a crash before the step ends
        does not ask for them again (nor would a retry of the step, the rows now cooling down)."""
        paid = [f for f in paid if f.error_class not in ("transient", "rate_limit")]  # those were not answered
        if paid and policy.record_failures is not None:
            paid, unrecorded[:] = unrecorded + paid, []
            try:
                await policy.record_failures(paid)
                recorded.update(f.index for f in paid)
            except Exception:  # noqa: BLE001 - the next ones take them, or the step when it ends
                unrecorded.extend(paid)
                return

    def settle(members: list[int]) -> None:
        for m in members:
            settled[m] = True
        tracker.add(len(members))

    async def run(batch: list[int]) -> None:
        """One batch: claim its texts, pay for those no other run is paying for, follow the others."""
        async with slots:
            async with in_order:  # batch by batch: the first request leaves after two round trips, not 2n
                taken = await claims.take([keys[i] for i in batch])
                answered = await policy.cache.get_many(sorted(taken))  # by another run since this one looked
            elsewhere.update({keys[i]: i for i in batch if keys[i] not in taken})
            reused = [k for k in answered if reuse(k, answered)]
            await claims.drop(reused)
            mine = [i for i in batch if keys[i] in taken and keys[i] not in reused]
            if mine:
                await attempt(mine)

    def reuse(key: str, answers: dict[str, bytes]) -> bool:
        """Keep another run's answer for every row with this text; False when it is not usable."""
        members = groups[key]
        if not all([stage.load(m, answers[key]) for m in members]):
            return False
        provider.usage.cache_hits += len(members)
        settle(members)
        return True

    async def attempt(batch: list[int]) -> None:
        answered = False
        try:
            answer, _ = await call_with_retries(
                provider,
                lambda: stage.send([sent[i] for i in batch]),
                inputs=len(batch),
                tokens=stage.reserve(
                    provider.metered_tokens([sent[i] for i in batch], sum(tokens[i] for i in batch)), len(batch)
                ),
                policy=policy,
                gate=gate,
            )
            answered = True
            results = stage.read(answer, len(batch))
        except (FatalProviderError, StopRequested) as exc:
            if isinstance(exc, StopRequested):
                return  # not sent, or not retried: the rows stay unsettled
            raise
        except Exception as exc:  # noqa: BLE001 - every other failure becomes a row failure
            if len(batch) > 1 and error_class(exc) in stage.split_on:
                half = len(batch) // 2
                await asyncio.gather(attempt(batch[:half]), attempt(batch[half:]))
                return
            made: list[RowFailure] = []
            for i in batch:  # every row the request stood for (identical texts share a request)
                made += fail(groups[keys[i]], error_class(exc), error_message(exc), getattr(exc, "attempts", 1))
            if answered:
                await record(made)
            await claims.drop([keys[i] for i in batch])
            return
        fresh: dict[str, bytes] = {}
        paid: list[RowFailure] = []
        for i, result in zip(batch, results, strict=True):
            members = groups[keys[i]]
            if isinstance(result, RowError):
                paid += fail(members, result.error_class, result.message)
                continue
            stage.keep(members, result)
            fresh[keys[i]] = stage.encode(result)
            settle(members)
        await keep_paid(policy.cache, fresh)  # paid for: keep it before anything else can go wrong
        await record(paid)
        await claims.drop([keys[i] for i in batch])

    async def send(rows: list[int]) -> None:
        planned = batches(rows, tokens, size, stage.max_batch_tokens)
        budget_cap = policy.limiter.request_token_cap()
        if budget_cap is not None:  # and within the rate budget's own burst, as the server meters
            metered = {i: provider.metered_tokens([sent[i]], tokens[i]) for i in rows}
            planned = [part for batch in planned for part in batches(batch, metered, size, budget_cap)]
        await asyncio.gather(*(run(b) for b in planned))

    async def follow(sending: asyncio.Future) -> None:
        """Texts another run is paying for: take its answer from the cache when it arrives, or pay for
        the text here if that run's claim lapses (it was stopped or killed) without one. It ends with the
        sending when nothing is followed (a poll's sleep after the last answer delayed every stage's end
        by up to ``claim_poll_seconds``, half of it on average)."""
        while (elsewhere or not sending.done()) and not policy.stop():
            if sending.done():
                await asyncio.sleep(policy.claim_poll_seconds)
            else:
                await asyncio.wait({sending}, timeout=policy.claim_poll_seconds)
            if not elsewhere:
                continue
            answers = await policy.cache.get_many(sorted(elsewhere))
            for key in answers:
                if reuse(key, answers):
                    del elsewhere[key]
            taken = await claims.take(sorted(elsewhere))
            await send([elsewhere.pop(k) for k in sorted(taken)])

    renewer = asyncio.ensure_future(claims.keep_renewed())
    try:
        sending = asyncio.ensure_future(send(leaders))
        await finish_or_stop(asyncio.gather(sending, follow(sending)), policy)
    finally:
        renewer.cancel()
        await claims.drop_all()  # what a stop left unsent is free for other runs at once
        _break_cycles(run, reuse, attempt, send, follow, fail, record, settle)
    unsent = [i for i in range(n) if not settled[i]]
    marked = [dataclasses.replace(f, recorded=f.index in recorded) for f in failures]
    return StageResult(sorted(marked, key=lambda f: f.index), unsent)


# -- embeddings --------------------------------------------------------------------------------------
@dataclass
class EmbedOutcome:
    vectors: np.ndarray
    ok: np.ndarray
    failures: list[RowFailure] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)


class EmbeddingStage(Stage[np.ndarray]):
    split_on = ("permanent", "invalid_output")  # a 400 for a whole batch: find the row at fault

    def __init__(self, provider: EmbeddingProvider, rows: int):
        self.provider = self.embedder = provider
        self.max_batch_tokens = provider.max_batch_tokens
        self.dim = provider.dimension
        self.vectors = np.zeros((rows, self.dim), dtype=np.float32)
        self.ok = np.zeros(rows, dtype=bool)

    def key(self, text: str) -> str:
        return embedding_key(self.provider.name, self.provider.model, self.dim, text)

    def load(self, row: int, cached: bytes) -> bool:
        vector = decode_vector(cached)
        if vector.shape != (self.dim,):
            return False
        self.vectors[row], self.ok[row] = vector, True
        return True

    async def send(self, texts: list[str]) -> object:
        return await self.embedder.embed(texts)

    def read(self, answer: object, rows: int) -> list[np.ndarray | RowError]:
        result = np.asarray(answer, dtype=np.float32)
        if result.ndim == 2 and result.shape[0] == rows and result.shape[1] != self.dim:
            raise FatalProviderError(
                f"{self.provider.name} {self.provider.model} answered {result.shape[1]}-dimensional vectors, but "
                f"embedding.dimension is {self.dim}: set embedding.dimension: {result.shape[1]} (or a model that "
                f"gives {self.dim})"
            )
        if result.shape != (rows, self.dim):
            raise ProviderError(
                f"provider returned shape {result.shape}, expected {(rows, self.dim)}", "invalid_output"
            )
        finite = np.asarray(np.isfinite(result).all(axis=1), dtype=bool).tolist()
        return [
            v if good else RowError("invalid_output", "provider returned non-finite values")
            for v, good in zip(result, list(finite), strict=True)
        ]

    def keep(self, rows: list[int], result: np.ndarray) -> None:
        self.vectors[rows], self.ok[rows] = result, True

    def encode(self, result: np.ndarray) -> bytes:
        return encode_vector(result)


async def embed_texts(
    provider: EmbeddingProvider,
    texts: Sequence[str],
    *,
    batch_size: int,
    policy: CallPolicy | None = None,
    max_in_flight: int | None = None,
    progress: ProgressFn | None = None,
    progress_every: int = 1000,
) -> EmbedOutcome:
    stage = EmbeddingStage(provider, len(texts))
    result = await run_stage(
        stage,
        texts,
        batch_size=batch_size,
        policy=policy or CallPolicy(),
        max_in_flight=max_in_flight,
        progress=progress,
        progress_every=progress_every,
    )
    return EmbedOutcome(vectors=stage.vectors, ok=stage.ok, failures=result.failures, unsent=result.unsent)


# -- enrichment --------------------------------------------------------------------------------------
@dataclass
class EnrichOutcome:
    results: list[Enrichment | None]
    failures: list[RowFailure] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)


def _schema_error(exc: ValidationError) -> RowError:
    details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in exc.errors())
    return RowError("invalid_output", f"answer violates the schema: {details}")


class EnrichmentStage(Stage[Enrichment]):
    def __init__(self, provider: EnrichmentProvider, rows: int, expected_output_tokens: int):
        self.provider = self.enricher = provider
        self.expected_output_tokens = expected_output_tokens
        self.results: list[Enrichment | None] = [None] * rows

    def key(self, text: str) -> str:
        return enrichment_key(self.provider.name, self.provider.model, text)

    def load(self, row: int, cached: bytes) -> bool:
        try:
            self.results[row] = Enrichment.model_validate(decode_answer(cached))
        except (ValidationError, ValueError):
            return False
        return True

    async def send(self, texts: list[str]) -> object:
        return await self.enricher.enrich(texts)

    def reserve(self, tokens: int, rows: int) -> int:
        return tokens + self.expected_output_tokens * rows

    def read(self, answer: object, rows: int) -> list[Enrichment | RowError]:
        if not isinstance(answer, list) or len(answer) != rows:
            size = len(answer) if isinstance(answer, list) else type(answer).__name__
            raise ProviderError(f"provider answered {size} of {rows} rows", "invalid_output")
        out: list[Enrichment | RowError] = []
        for item in answer:
            if isinstance(item, Exception):
                out.append(RowError(error_class(item), error_message(item)))
                continue
            try:
                out.append(Enrichment.model_validate(item))
            except ValidationError as exc:
                out.append(_schema_error(exc))
        return out

    def keep(self, rows: list[int], result: Enrichment) -> None:
        for row in rows:
            self.results[row] = result

    def encode(self, result: Enrichment) -> bytes:
        return encode_answer(result.model_dump())


async def enrich_texts(
    provider: EnrichmentProvider,
    texts: Sequence[str],
    *,
    batch_size: int,
    policy: CallPolicy | None = None,
    max_in_flight: int | None = None,
    progress: ProgressFn | None = None,
    progress_every: int = 200,
) -> EnrichOutcome:
    policy = policy or CallPolicy()
    stage = EnrichmentStage(provider, len(texts), policy.expected_output_tokens)
    result = await run_stage(
        stage,
        texts,
        batch_size=batch_size,
        policy=policy,
        max_in_flight=max_in_flight,
        progress=progress,
        progress_every=progress_every,
    )
    return EnrichOutcome(results=stage.results, failures=result.failures, unsent=result.unsent)
