"""The first paid requests of a ``materialize`` while Dagster starts.

A CLI command spends its first seconds importing Dagster, opening its instance and starting the first
run before a step sends anything (about 3 s on two cores): against a provider's rate limit, seconds of a
full bucket left unused. So ``materialize`` forks a head start before it imports Dagster. On the other
core it imports the provider's SDK, opens the database, checks the model, and reads and classifies (as the
detection step does) the first :data:`ROWS` rows needing work of the partitions the CLI will most likely
run. Once the CLI has settled which partitions it runs (and the operator confirmed), it sends those rows,
if the guess was right (else it reads the CLI's first partitions), through the engine, under the same
rate budget, paid-results cache and claims as the runs.

The head start stops as soon as the first run's paid step begins (:func:`taken_over`): its requests in
flight are answered and cached, the claims on its other texts are released. That step finds the answers
in the cache, follows those still in flight, and pays for the rest itself, so no text is paid twice. The
head start writes nothing (the runs do) and is an optimisation only: when it cannot start, its one line
says why and the runs do its rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from . import stopping
from .config import BackfillConfig, DatasetConfig, EmbeddingSpec, EnrichmentSpec, ProviderSpec
from .redact import mask_secrets

GO, CANCEL = "go", "cancel"
WAIT_SECONDS = 600.0  # for the CLI's go: confirmation at a terminal, the instance, the keys
# rows it reads and sends: seconds of a provider's budget at a tier's limits (about 6 s of 5M tokens a minute
# at 1,000 tokens a row; of 5,000 chat requests a minute), more than the first run takes to reach its step;
# fewer than a window of a run, to be read sooner (0.1 s less than 2,000 rows of 4 KB)
ROWS = 500

_handoff: dict[str, Any] = {"event": None}


def taken_over() -> None:
    """Called by a run's paid step as it begins (in the CLI's process or a worker it forked): the head
    start sends nothing more."""
    event = _handoff["event"]
    if event is not None:
        event.set()


def first_stage(dataset: DatasetConfig) -> EmbeddingSpec | EnrichmentSpec:
    return dataset.enrichment if dataset.enrichment.enabled else dataset.embedding


def why_not(dataset: DatasetConfig) -> str | None:
    """Why the dataset's first requests cannot go ahead of Dagster, or None when they can: its first stage
    calls a paid provider in real time, and a cache hands the answers to the runs."""
    spec = first_stage(dataset)
    if spec.provider in ("offline", "local"):
        return "nothing is paid for"
    if spec.mode == "batch":
        return "batch mode submits a partition as a whole"
    if dataset.cache.backend == "none":
        return "no cache (cache.backend: none) to hand its answers to the runs"
    if "fork" not in multiprocessing.get_all_start_methods():
        return "this platform cannot fork"
    return None


@dataclass(frozen=True)
class Asked:
    """What the command asks for, as far as it is known before Dagster: ``--force``, ``--limit`` (rows of
    work over the partitions in order, as the plan shares it), the partitions named (``--partition``), and
    whether rows were named (``--partition-of``)."""

    force: bool = False
    limit: int | None = None
    partitions: tuple[str, ...] = ()
    of_ids: bool = False


@dataclass
class HeadStart:
    """The CLI's handle on its head start process."""

    name: str
    process: Any
    conn: Any
    handoff: Any
    sent: bool = False

    def go(self, keys: list[str]) -> None:
        """The partitions the CLI runs, in order, settled and confirmed: the head start may pay."""
        if not self.sent:
            self.conn.send((GO, keys))
            self.sent = True

    def cancel(self) -> None:
        """Send nothing more (a head start not yet told to go pays for nothing); it ends by itself."""
        self.handoff.set()
        if not self.sent:
            with contextlib.suppress(BrokenPipeError, OSError):  # it is gone already
                self.conn.send((CANCEL, []))
            self.sent = True

    def finish(self, out: Any) -> dict[str, float]:
        """Stop it (if the runs did not), wait for its requests in flight, print its line on ``out``;
        return its figures for the run summary."""
        self.cancel()
        report: dict[str, Any] = {}
        with stopping.graceful_signals(at_once=self.process.kill):  # a second Ctrl+C does not wait for it
            answered = self.conn.poll(60.0)
        if answered:
            try:
                report = self.conn.recv()
            except EOFError:  # it died (a second Ctrl+C): its paid answers are in the cache already
                report = {}
        self.process.join(5.0)
        if self.process.is_alive():
            self.process.kill()
        if report.get("line"):
            print(f"head start: {report['line']}", file=out)
        return dict(report.get("figures", {}))


def begin(
    config: BackfillConfig, dataset_name: str | None, asked: Asked = Asked(), enabled: bool = True
) -> HeadStart | None:
    """Fork the head start for the first dataset ``materialize`` runs, or None when it cannot help."""
    names = [dataset_name] if dataset_name else list(config.datasets)
    if not enabled or not names or names[0] not in config.datasets:
        return None
    name, dataset = names[0], config.datasets[names[0]]
    if why_not(dataset) is not None:
        return None
    context = multiprocessing.get_context("fork")
    handoff = context.Event()
    theirs, ours = context.Pipe(duplex=True)
    process = context.Process(
        target=_child, args=(name, dataset, asked, theirs, ours, handoff, os.getpid()), name="head-start", daemon=True
    )
    process.start()
    theirs.close()
    _handoff["event"] = handoff  # inherited by the workers forked later
    return HeadStart(name, process, ours, handoff)


# -- the head start process ------------------------------------------------------------------------------
class _Log:
    """Its warnings on stderr, as the runs' console logger shows theirs; nothing else."""

    def info(self, message: str) -> None:
        pass

    def warning(self, message: str) -> None:
        print(f"head start: {message}", file=sys.stderr)


def _child(name: str, dataset: DatasetConfig, asked: Asked, conn: Any, parents: Any, handoff: Any, parent: int) -> None:
    parents.close()
    stopping.install_for_process()  # Ctrl+C reaches it too: it finishes its requests in flight and stops
    started = time.monotonic()
    try:
        report = asyncio.run(_work(name, dataset, asked, conn, handoff, parent, started))
    except Exception as exc:  # noqa: BLE001 - an optimisation: the runs do its rows and meet the same error
        report = {"line": f"stopped ({mask_secrets(f'{type(exc).__name__}: {exc}')[:300]}); the runs do its rows"}
    with contextlib.suppress(BrokenPipeError, OSError):  # the CLI is gone
        conn.send(report)
    sys.stdout.flush()
    os._exit(0)  # not the CLI's exit handlers, inherited by the fork


async def _work(
    name: str, dataset: DatasetConfig, asked: Asked, conn: Any, handoff: Any, parent: int, started: float
) -> dict:
    from .engine import embed_texts, enrich_texts
    from .policy import build_policy, failure_recorder
    from .providers import build_embedding_provider, build_enrichment_provider, read_api_key, warm_up
    from .stores import open_store

    spec = first_stage(dataset)
    warm_up(spec)  # the SDK and the tokenizer, while the CLI imports Dagster
    enriching = isinstance(spec, EnrichmentSpec)
    stage_name = "enrichment" if enriching else "embedding"
    provider: Any = (
        build_enrichment_provider(spec, read_api_key(spec, stage_name))
        if isinstance(spec, EnrichmentSpec)
        else build_embedding_provider(spec, read_api_key(spec, stage_name))
    )
    stop: Callable[[], bool] = lambda: handoff.is_set() or stopping.requested() or os.getppid() != parent  # noqa: E731
    with open_store(name, dataset) as store:
        await provider.preflight()
        # read and classified while the CLI settles the partitions (from the table, as it will), paid for
        # only if they are the first of those it runs
        guessed = await asyncio.to_thread(_guessed_window, store, dataset, asked)
        kind, keys = await asyncio.to_thread(_wait_for_go, conn, parent)
        if kind != GO or stop():
            await provider.aclose()
            return {}
        if guessed is not None and keys[: len(guessed[1])] == guessed[1]:
            todo = guessed[0]
        else:  # the guess was not the CLI's first partitions: read those
            todo, _ = await asyncio.to_thread(_first_window, store, dataset, keys, asked)
        flag = "needs_enrichment" if enriching else "needs_embedding"
        todo = todo.filter(pc.fill_null(todo.column(flag), False)) if todo.num_rows else todo
        if not todo.num_rows or (not enriching and dataset.embedding.include_enrichment):
            await provider.aclose()
            return {}
        policy = build_policy(dataset, spec, store.ledger, getattr(spec, "expected_output_tokens", 0), stop=stop)
        ids = todo.column("id").to_pylist()
        policy.record_failures = failure_recorder(store.ledger, ids, stage_name, asyncio.Lock())
        ahead = _ahead(dataset, store, stop) if enriching else None
        first = time.monotonic() - started
        texts = todo.column("text").to_pylist()
        try:
            alongside = asyncio.ensure_future(ahead.window(todo)) if ahead is not None else None
            if enriching:
                await enrich_texts(provider, texts, batch_size=spec.batch_size, policy=policy)
            else:
                await embed_texts(provider, texts, batch_size=spec.batch_size, policy=policy)
            if alongside is not None:
                await alongside
        finally:
            await provider.aclose()
            await policy.cache.aclose()
            if ahead is not None:
                await ahead.aclose()
    return _report(stage_name, provider.usage, spec, first, ahead, dataset)


def _ahead(dataset: DatasetConfig, store: Any, stop: Callable[[], bool]) -> Any:
    from .embed_ahead import embeddings_ahead, embeds_ahead
    from .providers import build_embedding_provider, read_api_key

    if not embeds_ahead(dataset):
        return None
    provider = build_embedding_provider(dataset.embedding, read_api_key(dataset.embedding, "embedding"))
    return embeddings_ahead(dataset, provider, store.ledger, stop, _Log())


def _wait_for_go(conn: Any, parent: int) -> tuple[str, list[str]]:
    waited = 0.0
    while waited < WAIT_SECONDS:
        if conn.poll(0.1):
            try:
                return conn.recv()
            except EOFError:
                break
        waited += 0.1
        if os.getppid() != parent:
            break
    return CANCEL, []


def _guessed_window(store: Any, dataset: DatasetConfig, asked: Asked) -> tuple[pa.Table, list[str]] | None:
    """The first window of the partitions the CLI will most likely run: those named, or those holding rows
    in key order (registered ones, for id ranges and archives, which only the CLI can tell)."""
    from .partitions import partition_activity
    from .stores import SchemaError

    if asked.of_ids:
        return None
    keys = list(asked.partitions) or [key for key, _ in partition_activity(store.rows, dataset)]
    try:
        return _first_window(store, dataset, keys, asked)
    except SchemaError:  # a key as typed (an archive value, say): the CLI's keys are read after the go
        return None


def _first_window(store: Any, dataset: DatasetConfig, keys: list[str], asked: Asked) -> tuple[pa.Table, list[str]]:
    """The first :data:`ROWS` rows needing work (at most a run's window), partitions in the CLI's order,
    classified as the detection step does (failures cooling down left out, ``--limit`` applied), and the
    keys read for them."""
    found: list[pa.Table] = []
    count, rows = 0, min(ROWS, dataset.rows_in_memory)
    read: list[str] = []
    with contextlib.closing(_detected(store, dataset, keys, asked, read)) as tables:
        for detected in tables:
            work = pc.or_(detected.column("needs_embedding"), detected.column("needs_enrichment"))
            detected = detected.filter(work).select(["id", "text", "needs_embedding", "needs_enrichment"])
            found.append(detected.slice(0, rows - count))
            count += found[-1].num_rows
            if count >= rows:
                break
    return (pa.concat_tables(found) if found else pa.table({})), read


def _detected(
    store: Any, dataset: DatasetConfig, keys: list[str], asked: Asked, read: list[str]
) -> Generator[pa.Table, None, None]:
    from .partitions import partition_spec
    from .steps import classify

    left = asked.limit
    for key in keys:
        if left == 0:
            return
        read.append(key)
        part = partition_spec(key, dataset, store.rows)
        with contextlib.closing(store.rows.read_batches(part, min(ROWS, dataset.read_batch_size))) as batches:
            for batch in batches:
                detected, left = classify(store, dataset, pa.Table.from_batches([batch]), force=asked.force, left=left)
                yield detected
                if left == 0:
                    break


def _report(stage: str, usage: Any, spec: ProviderSpec, first: float, ahead: Any, dataset: DatasetConfig) -> dict:
    """Its line, and its figures for the summary: what it paid for, under the stage's own names (the runs
    count the answers they took from it as cache hits)."""
    from .reporting import usage_metadata
    from .run_summary import PAID

    figures: dict[str, float] = {}
    for prefix, what, spec_of in (("provider", stage, spec), ("embedding_ahead", "embedding", dataset.embedding)):
        if prefix == "embedding_ahead" and ahead is None:
            continue
        paid = usage if prefix == "provider" else ahead.provider.usage
        values = usage_metadata(paid, spec_of)
        for k in PAID:
            figures[f"{what}_{k}"] = figures.get(f"{what}_{k}", 0) + values[f"provider_{k}"]
    line = (
        f"{usage.inputs} texts paid for ({stage}, {usage.requests} requests, sending from {first:.1f}s after it "
        "forked) while Dagster started; the runs took the answers from the cache"
    )
    if ahead is not None and ahead.provider.usage.inputs:
        line += f", with {ahead.provider.usage.inputs} embeddings sent alongside"
    return {"line": line, "figures": figures}
