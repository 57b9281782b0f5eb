"""The asset graph of one dataset, partition by partition:

raw_rows -> detected_placeholders -> llm_enrichment -> embeddings -> written_table

Every asset shares the dataset's partitions and retry policy. Intermediate tables go through the Parquet
IO manager, so a retried step reloads what upstream already computed and paid for.
"""

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TypeVar

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from .config import ConfigError, DatasetConfig, ProviderSpec
from .detection import Reason, apply_limit, detect, reason_counts
from .engine import CallPolicy, FatalProviderError, embed_texts, enrich_texts
from .partitions import partition_spec
from .policy import build_policy
from .providers.base import EmbeddingProvider, EnrichmentProvider, Usage
from .resources import DatabaseResource, embedding_provider, enrichment_provider, resource_keys
from .rows import enrichment_col, matrix_array
from .stores import Failure, SchemaError
from .stores.base import utc_now
from .text import embedding_input

IO_MANAGER_KEY = "parquet_io_manager"
ASSET_NAMES = ("raw_rows", "detected_placeholders", "llm_enrichment", "embeddings", "written_table")
EMBEDDING_POOL = "embedding_api"
ENRICHMENT_POOL = "llm_api"


class RawRowsConfig(dg.Config):
    migrate: bool = Field(
        default=False, description="Add missing result columns and the failures table before reading."
    )


class DetectionConfig(dg.Config):
    force: bool = Field(default=False, description="Redo every row with text, valid or not (model migration).")
    requeue_failed: bool = Field(default=False, description="Retry failed rows now, ignoring their cool-down.")
    limit: int | None = Field(default=None, gt=0, description="Process at most this many rows in this run.")


def _timing(started: float, rows: int) -> dict[str, dg.MetadataValue]:
    seconds = max(time.monotonic() - started, 1e-9)
    return {
        "duration_seconds": dg.MetadataValue.float(round(seconds, 3)),
        "rows_per_second": dg.MetadataValue.float(round(rows / seconds, 1)),
    }


def _usage_metadata(usage: Usage, prefix: str, spec: ProviderSpec | None = None) -> dict[str, dg.MetadataValue]:
    cost = usage.cost(spec.price_per_million_input_tokens, spec.price_per_million_output_tokens) if spec else 0.0
    return {
        f"{prefix}_cache_hits": dg.MetadataValue.int(usage.cache_hits),
        f"{prefix}_cost_usd": dg.MetadataValue.float(round(cost, 6)),
        f"{prefix}_requests": dg.MetadataValue.int(usage.requests),
        f"{prefix}_inputs": dg.MetadataValue.int(usage.inputs),
        f"{prefix}_input_tokens": dg.MetadataValue.int(usage.input_tokens),
        f"{prefix}_output_tokens": dg.MetadataValue.int(usage.output_tokens),
        f"{prefix}_rate_limited": dg.MetadataValue.int(usage.rate_limited),
        f"{prefix}_retries": dg.MetadataValue.int(usage.retries),
        f"{prefix}_truncated_inputs": dg.MetadataValue.int(usage.truncated_inputs),
    }


def _progress_logger(context: dg.AssetExecutionContext, stage: str) -> Callable[[int, int], None]:
    started = time.monotonic()

    def log(done: int, total: int) -> None:
        elapsed = max(time.monotonic() - started, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else float("inf")
        context.log.info(
            f"{stage}: {done}/{total} rows ({100 * done / max(total, 1):.1f}%), "
            f"{rate:.1f} rows/s, elapsed {elapsed:.1f}s, ETA {eta:.1f}s"
        )

    return log


LEASE_GRACE = timedelta(hours=1)
T = TypeVar("T")


@contextmanager
def schema_errors_fail_without_retry() -> Iterator[None]:
    """A table that does not fit the config will not fit it on retry either: fail at once, clearly."""
    try:
        yield
    except SchemaError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None


def _run_alive(instance: dg.DagsterInstance) -> Callable[[str, datetime], bool]:
    """Whether the run holding a partition's lease may still be working on it.

    A run this instance knows is alive until it finishes; a run it does not know (another deployment)
    is trusted for an hour after it took the lease.
    """

    def alive(run_id: str, since: datetime) -> bool:
        run = instance.get_run_by_id(run_id)
        if run is None:
            return utc_now() - since < LEASE_GRACE
        return not run.is_finished

    return alive


def run_stage(
    context: dg.AssetExecutionContext,
    stage: str,
    database: DatabaseResource,
    name: str,
    dataset: DatasetConfig,
    spec: ProviderSpec,
    make_provider: Callable[[], EmbeddingProvider | EnrichmentProvider],
    work: Callable[[EmbeddingProvider | EnrichmentProvider, CallPolicy], Awaitable[T]],
) -> tuple[T, Usage]:
    """Build the provider, check it with a free call, run the engine; errors that retrying cannot fix
    (missing key, unknown model, refused key) fail the step at once with their message."""
    expected = getattr(spec, "expected_output_tokens", 0)
    with database.open(name, dataset) as store:
        try:
            provider = make_provider()
        except ConfigError as exc:
            raise dg.Failure(description=f"{stage}: {exc}", allow_retries=False) from None
        policy = build_policy(dataset, spec, store, expected)

        async def go() -> T:
            try:
                await provider.preflight()
                return await work(provider, policy)
            finally:
                await provider.aclose()
                close = getattr(policy.cache, "aclose", None)
                if close is not None:
                    await close()

        try:
            outcome = asyncio.run(go())
        except (ConfigError, FatalProviderError) as exc:
            raise dg.Failure(description=f"{stage}: {exc}", allow_retries=False) from None
    usage = provider.usage
    cost = usage.cost(spec.price_per_million_input_tokens, spec.price_per_million_output_tokens)
    context.log.info(
        f"{stage} accounting: {usage.requests} requests, {usage.input_tokens} tokens in, {usage.output_tokens} out, "
        f"{usage.rate_limited} rate-limited (429), {usage.retries} retries, {usage.cache_hits} cache hits, "
        f"{usage.truncated_inputs} inputs truncated, cost ${cost:.4f}"
    )
    return outcome, usage


def enrichment_schema(dataset: DatasetConfig) -> pa.Schema:
    fields = [pa.field("id", pa.int64())]
    fields += [pa.field(enrichment_col(f), pa.string()) for f in dataset.enrichment_columns]
    fields += [pa.field("error_class", pa.string()), pa.field("error", pa.string())]
    return pa.schema(fields)


def embeddings_schema(dataset: DatasetConfig) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.int64()),
            pa.field("embedding", pa.list_(pa.float32(), dataset.embedding.dimension)),
            pa.field("content_hash", pa.string()),
            pa.field("model", pa.string()),
            pa.field("error_class", pa.string()),
            pa.field("error", pa.string()),
        ]
    )


def build_dataset_assets(
    name: str, dataset: DatasetConfig, partitions_def: dg.PartitionsDefinition
) -> list[dg.AssetsDefinition]:
    """The five assets of dataset ``name``, under the asset key prefix ``name``."""
    keys = resource_keys(name)
    common = {
        "key_prefix": [name],
        "group_name": name,
        "partitions_def": partitions_def,
        "retry_policy": dg.RetryPolicy(
            max_retries=dataset.retry.max_retries,
            delay=dataset.retry.delay_seconds,
            backoff=dg.Backoff.EXPONENTIAL,
            jitter=dg.Jitter.PLUS_MINUS,
        ),
    }
    store_kind = "sqlite" if dataset.database_url_value().startswith("sqlite") else "postgres"

    def key(asset: str) -> dg.AssetKey:
        return dg.AssetKey([name, asset])

    def database(context: dg.AssetExecutionContext) -> DatabaseResource:
        return getattr(context.resources, keys["database"])

    @dg.asset(
        name="raw_rows",
        io_manager_key=IO_MANAGER_KEY,
        required_resource_keys={keys["database"]},
        kinds={store_kind, "parquet"},
        description=f"The rows of {dataset.table} in this partition: id, text fields, the stored embedding, "
        "content hash, model and enrichment, read in batches.",
        **common,
    )
    def raw_rows(context: dg.AssetExecutionContext, config: RawRowsConfig) -> dg.Output[pa.Table]:
        started = time.monotonic()
        with schema_errors_fail_without_retry(), database(context).open(name, dataset) as store:
            if config.migrate:
                added = store.migrate()
                context.log.info(f"migration added: {', '.join(added) or 'nothing (schema up to date)'}")
            store.check_schema()
            part = partition_spec(context.partition_key, dataset, store)
            holder = store.claim_partition(part.key, context.run.run_id, _run_alive(context.instance))
            if holder is not None:
                message = (
                    f"partition {part.key} is being processed by run {holder}; this run skips it "
                    "(nothing read, no provider called, nothing written)"
                )
                context.log.warning(message)
                return dg.Output(
                    store.raw_schema().empty_table(),
                    metadata={"rows_in": 0, "skipped": message, "held_by_run": holder},
                )
            table = store.read_partition(part)
        context.log.info(f"read {table.num_rows} rows of partition {part.key}")
        return dg.Output(
            table,
            metadata={"rows_in": dg.MetadataValue.int(table.num_rows), **_timing(started, table.num_rows)},
        )

    @dg.asset(
        name="detected_placeholders",
        io_manager_key=IO_MANAGER_KEY,
        ins={"raw_rows": dg.AssetIn(key=key("raw_rows"))},
        required_resource_keys={keys["database"]},
        kinds={"numpy", "parquet"},
        description="Every row classified with its reason: null, wrong dimension, placeholder (sequential, "
        "constant, zero), non-finite, stale text, other model, missing enrichment, no text, or ok.",
        **common,
    )
    def detected_placeholders(
        context: dg.AssetExecutionContext, config: DetectionConfig, raw_rows: pa.Table
    ) -> dg.Output[pa.Table]:
        started = time.monotonic()
        cooling: set[object] = set()
        if not config.force:
            ids = raw_rows.column("id").to_pylist()
            with schema_errors_fail_without_retry(), database(context).open(name, dataset) as store:
                if config.requeue_failed:
                    requeued = store.requeue_failures(ids)
                    context.log.info(f"re-queued {requeued} failed rows")
                cooling = store.cooling_down_ids(ids, dataset.failure_cooldown_hours)
        detected = detect(raw_rows, dataset, force=config.force, cooling_ids=cooling)
        if config.limit:
            detected = apply_limit(detected, config.limit)
        counts = reason_counts(detected)
        need_embed = pc.sum(detected.column("needs_embedding")).as_py() or 0
        need_enrich = pc.sum(detected.column("needs_enrichment")).as_py() or 0
        context.log.info(f"detection: {json.dumps(counts, sort_keys=True)}")
        return dg.Output(
            detected,
            metadata={
                "rows_in": dg.MetadataValue.int(detected.num_rows),
                "rows_needing_embedding": dg.MetadataValue.int(need_embed),
                "rows_needing_enrichment": dg.MetadataValue.int(need_enrich),
                "reasons": dg.MetadataValue.json(counts),
                **{f"rows_{r.value}": dg.MetadataValue.int(counts.get(r.value, 0)) for r in Reason},
                **_timing(started, detected.num_rows),
            },
        )

    @dg.asset(
        name="llm_enrichment",
        io_manager_key=IO_MANAGER_KEY,
        ins={"detected_placeholders": dg.AssetIn(key=key("detected_placeholders"))},
        required_resource_keys={keys["enrichment_key"], keys["database"]},
        kinds={dataset.enrichment.provider, "parquet"},
        pool=ENRICHMENT_POOL,
        description="Skills, seniority and a summary for each row that needs them, validated against the "
        "schema; a row whose answer fails is recorded with its message and never stops the partition.",
        **common,
    )
    def llm_enrichment(context: dg.AssetExecutionContext, detected_placeholders: pa.Table) -> dg.Output[pa.Table]:
        started = time.monotonic()
        schema = enrichment_schema(dataset)
        todo = detected_placeholders.filter(pc.field("needs_enrichment"))
        if not dataset.enrichment.enabled or todo.num_rows == 0:
            why = "enrichment disabled for this dataset" if not dataset.enrichment.enabled else "no row needs it"
            context.log.info(f"enrichment skipped: {why}")
            return dg.Output(
                schema.empty_table(),
                metadata={"rows_in": 0, "skipped": why, **_usage_metadata(Usage(), "provider")},
            )
        texts = todo.column("text").to_pylist()
        spec = dataset.enrichment
        outcome, usage = run_stage(
            context,
            "enrichment",
            database(context),
            name,
            dataset,
            spec,
            lambda: enrichment_provider(dataset, getattr(context.resources, keys["enrichment_key"])),
            lambda provider, policy: enrich_texts(
                provider,
                texts,
                batch_size=spec.batch_size,
                policy=policy,
                progress=_progress_logger(context, "enrichment"),
            ),
        )
        errors: list[tuple[str | None, str | None]] = [(None, None)] * todo.num_rows
        for failure in outcome.failures:
            errors[failure.index] = (failure.error_class, failure.message)
            context.log.warning(
                f"enrichment failed for row id {todo.column('id')[failure.index].as_py()}: "
                f"[{failure.error_class}] {failure.message}"
            )
        columns: dict[str, list] = {"id": todo.column("id").to_pylist()}
        for field in dataset.enrichment_columns:
            values = []
            for result in outcome.results:
                if result is None:
                    values.append(None)
                elif field == "skills":
                    values.append(json.dumps(result.skills, ensure_ascii=False))
                else:
                    values.append(getattr(result, field))
            columns[enrichment_col(field)] = values
        columns["error_class"] = [e[0] for e in errors]
        columns["error"] = [e[1] for e in errors]
        table = pa.table(columns, schema=schema)
        failed = len(outcome.failures)
        return dg.Output(
            table,
            metadata={
                "rows_in": dg.MetadataValue.int(todo.num_rows),
                "rows_enriched": dg.MetadataValue.int(todo.num_rows - failed),
                "rows_failed": dg.MetadataValue.int(failed),
                **_usage_metadata(usage, "provider", spec),
                **_timing(started, todo.num_rows),
            },
        )

    @dg.asset(
        name="embeddings",
        io_manager_key=IO_MANAGER_KEY,
        ins={
            "detected_placeholders": dg.AssetIn(key=key("detected_placeholders")),
            "llm_enrichment": dg.AssetIn(key=key("llm_enrichment")),
        },
        required_resource_keys={keys["embedding_key"], keys["database"]},
        kinds={dataset.embedding.provider, "parquet"},
        pool=EMBEDDING_POOL,
        description=f"{dataset.embedding.dimension}-dim vectors from {dataset.embedding.provider} "
        f"{dataset.embedding.model} for each row that needs one, embedded in batches.",
        **common,
    )
    def embeddings(
        context: dg.AssetExecutionContext, detected_placeholders: pa.Table, llm_enrichment: pa.Table
    ) -> dg.Output[pa.Table]:
        started = time.monotonic()
        schema = embeddings_schema(dataset)
        todo = detected_placeholders.filter(pc.field("needs_embedding"))
        held_back = 0
        if dataset.embedding.include_enrichment and llm_enrichment.num_rows:
            failed_ids = pc.filter(llm_enrichment.column("id"), pc.is_valid(llm_enrichment.column("error")))
            keep = pc.invert(pc.is_in(todo.column("id"), value_set=failed_ids))
            held_back = todo.num_rows - (pc.sum(keep).as_py() or 0)
            todo = todo.filter(keep)
        if todo.num_rows == 0:
            context.log.info("embeddings skipped: no row needs one")
            return dg.Output(
                schema.empty_table(),
                metadata={"rows_in": 0, "rows_held_back": held_back, **_usage_metadata(Usage(), "provider")},
            )
        texts = _embedding_texts(dataset, todo, llm_enrichment)
        spec = dataset.embedding
        outcome, usage = run_stage(
            context,
            "embeddings",
            database(context),
            name,
            dataset,
            spec,
            lambda: embedding_provider(dataset, getattr(context.resources, keys["embedding_key"])),
            lambda provider, policy: embed_texts(
                provider,
                texts,
                batch_size=spec.batch_size,
                policy=policy,
                progress=_progress_logger(context, "embeddings"),
            ),
        )
        error_class: list[str | None] = [None] * todo.num_rows
        error: list[str | None] = [None] * todo.num_rows
        for failure in outcome.failures:
            error_class[failure.index], error[failure.index] = failure.error_class, failure.message
            context.log.warning(
                f"embedding failed for row id {todo.column('id')[failure.index].as_py()}: "
                f"[{failure.error_class}] {failure.message}"
            )
        ok = outcome.ok
        table = pa.table(
            {
                "id": todo.column("id"),
                "embedding": matrix_array(outcome.vectors, ok),
                "content_hash": pc.if_else(pa.array(ok), todo.column("content_hash"), pa.scalar(None, pa.string())),
                "model": pa.array([spec.model if good else None for good in ok], pa.string()),
                "error_class": pa.array(error_class, pa.string()),
                "error": pa.array(error, pa.string()),
            },
            schema=schema,
        )
        return dg.Output(
            table,
            metadata={
                "rows_in": dg.MetadataValue.int(todo.num_rows),
                "rows_embedded": dg.MetadataValue.int(int(ok.sum())),
                "rows_failed": dg.MetadataValue.int(len(outcome.failures)),
                "rows_held_back": dg.MetadataValue.int(held_back),
                **_usage_metadata(usage, "provider", spec),
                **_timing(started, todo.num_rows),
            },
        )

    @dg.asset(
        name="written_table",
        ins={
            "detected_placeholders": dg.AssetIn(key=key("detected_placeholders")),
            "llm_enrichment": dg.AssetIn(key=key("llm_enrichment")),
            "embeddings": dg.AssetIn(key=key("embeddings")),
        },
        required_resource_keys={keys["database"]},
        kinds={store_kind},
        description=f"Results written back to {dataset.target.table or dataset.table} in batches, one "
        "transaction each; only the embedding, enrichment and bookkeeping columns change.",
        **common,
    )
    def written_table(
        context: dg.AssetExecutionContext,
        detected_placeholders: pa.Table,
        llm_enrichment: pa.Table,
        embeddings: pa.Table,
    ) -> dg.MaterializeResult:
        started = time.monotonic()
        results = merge_results(dataset, llm_enrichment, embeddings)
        failures = [
            Failure(row_id=r["id"], stage=stage, error_class=r["error_class"], message=r["error"])
            for stage, table in (("enrichment", llm_enrichment), ("embedding", embeddings))
            for r in table.filter(pc.is_valid(table.column("error"))).select(["id", "error_class", "error"]).to_pylist()
        ]
        failed_ids = {f.row_id for f in failures}
        succeeded = [i for i in results.column("id").to_pylist() if i not in failed_ids]
        with schema_errors_fail_without_retry(), database(context).open(name, dataset) as store:
            stats = store.write_results(results, dataset.write_batch_size)
            store.record_failures(failures)
            store.clear_failures(succeeded)
            store.release_partition(context.partition_key, context.run.run_id)
        counts = reason_counts(detected_placeholders)
        enrich_failed = sum(1 for f in failures if f.stage == "enrichment")
        embed_failed = sum(1 for f in failures if f.stage == "embedding")
        rows_in = detected_placeholders.num_rows
        summary = (
            f"partition {context.partition_key}: {rows_in} rows in, {stats.rows_written} written, "
            f"{counts.get(Reason.OK.value, 0)} already up to date, {counts.get(Reason.NO_TEXT.value, 0)} "
            f"skipped (no text), {enrich_failed} enrichment failures, {embed_failed} embedding failures, "
            f"{counts.get(Reason.COOLING_DOWN.value, 0)} failed earlier and cooling down"
        )
        context.log.info(summary)
        return dg.MaterializeResult(
            metadata={
                "rows_in": dg.MetadataValue.int(rows_in),
                "rows_written": dg.MetadataValue.int(stats.rows_written),
                "write_batches": dg.MetadataValue.int(stats.batches),
                "rows_up_to_date": dg.MetadataValue.int(counts.get(Reason.OK.value, 0)),
                "rows_skipped_no_text": dg.MetadataValue.int(counts.get(Reason.NO_TEXT.value, 0)),
                "rows_cooling_down": dg.MetadataValue.int(counts.get(Reason.COOLING_DOWN.value, 0)),
                "rows_deferred": dg.MetadataValue.int(counts.get(Reason.DEFERRED.value, 0)),
                "rows_enrichment_failed": dg.MetadataValue.int(enrich_failed),
                "rows_embedding_failed": dg.MetadataValue.int(embed_failed),
                "summary": summary,
                **_timing(started, stats.rows_written),
            }
        )

    return [raw_rows, detected_placeholders, llm_enrichment, embeddings, written_table]


def _embedding_texts(dataset: DatasetConfig, todo: pa.Table, enrichment: pa.Table) -> list[str]:
    texts = todo.column("text").to_pylist()
    if not dataset.embedding.include_enrichment:
        return texts
    fresh: dict[object, tuple[str | None, str | None]] = {}
    if enrichment.num_rows:
        summaries = (
            enrichment.column(enrichment_col("summary")).to_pylist()
            if "summary" in dataset.enrichment_columns
            else None
        )
        skills = (
            enrichment.column(enrichment_col("skills")).to_pylist() if "skills" in dataset.enrichment_columns else None
        )
        for i, row_id in enumerate(enrichment.column("id").to_pylist()):
            fresh[row_id] = (summaries[i] if summaries else None, skills[i] if skills else None)

    def stored(field: str) -> list:
        column = enrichment_col(field)
        return todo.column(column).to_pylist() if column in todo.column_names else [None] * todo.num_rows

    stored_summary, stored_skills = stored("summary"), stored("skills")
    out = []
    for i, (row_id, text) in enumerate(zip(todo.column("id").to_pylist(), texts, strict=True)):
        summary, skills = fresh.get(row_id, (stored_summary[i], stored_skills[i]))
        out.append(embedding_input(text, summary, skills))
    return out


def merge_results(dataset: DatasetConfig, enrichment: pa.Table, embeddings: pa.Table) -> pa.Table:
    """One row per id with a successful result, holding the columns to write (nulls leave values alone).

    The content hash says "embedding and enrichment were made from this text": a row whose enrichment
    failed keeps its old hash, so the next run still sees it as needing enrichment.
    """
    if enrichment.num_rows:
        enrichment_failed = pc.filter(enrichment.column("id"), pc.is_valid(enrichment.column("error")))
        unhashed = pc.is_in(embeddings.column("id"), value_set=enrichment_failed)
        embeddings = embeddings.set_column(
            embeddings.schema.get_field_index("content_hash"),
            "content_hash",
            pc.if_else(unhashed, pa.scalar(None, pa.string()), embeddings.column("content_hash")),
        )
    emb = embeddings.filter(pc.is_null(embeddings.column("error")))
    enr = enrichment.filter(pc.is_null(enrichment.column("error")))
    emb_ids = emb.column("id").to_pylist()
    enr_ids = enr.column("id").to_pylist()
    ids = sorted(set(emb_ids) | set(enr_ids))
    emb_pos = {i: n for n, i in enumerate(emb_ids)}
    enr_pos = {i: n for n, i in enumerate(enr_ids)}
    emb_take = pa.array([emb_pos.get(i) for i in ids], pa.int64())
    enr_take = pa.array([enr_pos.get(i) for i in ids], pa.int64())
    now = utc_now().isoformat()
    columns: dict[str, pa.Array] = {"id": pa.array(ids, pa.int64())}
    for column in ("embedding", "content_hash", "model"):
        columns[column] = pc.take(emb.column(column), emb_take)
    columns["embedded_at"] = pc.if_else(pc.is_valid(emb_take), pa.scalar(now), pa.scalar(None, pa.string()))
    if dataset.enrichment.enabled:
        for field in dataset.enrichment_columns:
            columns[enrichment_col(field)] = pc.take(enr.column(enrichment_col(field)), enr_take)
        columns["enriched_at"] = pc.if_else(pc.is_valid(enr_take), pa.scalar(now), pa.scalar(None, pa.string()))
    return pa.table(columns)
