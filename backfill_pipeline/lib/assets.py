"""The asset graph of one dataset, partition by partition:

raw_rows -> detected_placeholders -> llm_enrichment -> embeddings -> written_table

Every asset shares the dataset's partitions and retry policy; each is a thin wrapper over a plain
function in :mod:`backfill_pipeline.steps` or :mod:`backfill_pipeline.provider_steps`. Intermediate tables
are spools (Parquet written and read in row groups) kept by the Parquet IO manager, so a retried step
reloads what upstream already computed and paid for, and no step holds a whole partition in memory.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
from pydantic import Field

from .. import provider_steps, steps, stopping
from ..config import ConfigError, DatasetConfig
from ..embed_ahead import embeds_ahead
from ..engine import FatalProviderError
from ..leases import Lease, fresh_within
from ..redact import mask_secrets
from ..spool import Spool
from ..stores import SchemaError
from .resources import DatabaseResource, DatasetResources, ResourceKeys

IO_MANAGER_KEY = "parquet_io_manager"
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


@contextmanager
def step_boundary(
    context: dg.AssetExecutionContext, stage: str, last: bool = False, inputs: tuple[Spool, ...] = ()
) -> Iterator[None]:
    """Around each step: a first Ctrl+C or SIGTERM (a run terminated from the UI) asks for a graceful stop
    (see :mod:`backfill_pipeline.stopping`), which ends the run after this step unless it is the ``last``;
    a table that does not fit the config, a missing key or an unknown model will not be fixed by a retry:
    fail at once, with the one-line message. Scratch copies of the ``inputs`` are deleted after it."""
    stopping.enter_run(context.run.run_id)
    try:
        with stopping.graceful_signals():
            yield
    except (SchemaError, ConfigError, FatalProviderError) as exc:
        raise dg.Failure(description=mask_secrets(f"{stage}: {exc}"), allow_retries=False) from None
    finally:
        for spool in inputs:
            spool.discard()
    if stopping.requested() and not last:
        end_run_canceled(context)


def end_run_canceled(context: dg.AssetExecutionContext) -> None:
    """End the run after a graceful stop: the step that stopped has written what it completed. Marked
    canceling first (a run terminated from the UI already is), the failed step makes Dagster record the run
    as canceled; an interrupt would instead be retried, and write again."""
    run = context.instance.get_run_by_id(context.run.run_id)
    if run is not None and run.status == dg.DagsterRunStatus.STARTED:
        context.instance.report_run_canceling(run, message=f"stop requested by {stopping.reason()}")
    raise dg.Failure(
        description=f"stopped by {stopping.reason()}: {stopping.written()} completed rows written; the rest is "
        "left for the next run",
        allow_retries=False,
    )


def spool_output(out: steps.StepResult) -> dg.Output[Spool]:
    if out.table is None:
        raise TypeError("a step that feeds another returned no table")
    return dg.Output(out.table, metadata=out.metadata)


def partition_lease(context: dg.AssetExecutionContext, dataset: DatasetConfig, database: DatabaseResource) -> Lease:
    """The lease of this run on this partition: alive while renewed, ended early by a finished run."""

    def finished(run_id: str) -> bool:
        run = context.instance.get_run_by_id(run_id)
        return run is not None and run.is_finished

    return Lease(
        open_store=lambda: database.open(dataset),
        key=context.partition_key,
        run_id=context.run.run_id,
        is_alive=fresh_within(dataset.lease_seconds, finished),
        seconds=dataset.lease_seconds,
    )


def build_dataset_assets(
    name: str, dataset: DatasetConfig, partitions_def: dg.PartitionsDefinition
) -> list[dg.AssetsDefinition]:
    """The five assets of dataset ``name``, under the asset key prefix ``name``."""
    keys = ResourceKeys.of(name)
    retry = dg.RetryPolicy(
        max_retries=dataset.retry.max_retries,
        delay=dataset.retry.delay_seconds,
        backoff=dg.Backoff.EXPONENTIAL,
        jitter=dg.Jitter.PLUS_MINUS,
    )
    store_kind = dataset.store_kind

    def asset(
        asset_name: str, *inputs: str, resources: set[str], kinds: set[str], **extra: Any
    ) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
        return dg.asset(
            name=asset_name,
            key_prefix=[name],
            group_name=name,
            partitions_def=partitions_def,
            retry_policy=retry,
            ins={i: dg.AssetIn(key=dg.AssetKey([name, i])) for i in inputs},
            required_resource_keys=resources,
            kinds=kinds,
            **extra,
        )

    def res(context: dg.AssetExecutionContext) -> DatasetResources:
        return keys.resolve(context.resources)

    @asset(
        "raw_rows",
        resources=keys.database_only(),
        kinds={store_kind, "parquet"},
        io_manager_key=IO_MANAGER_KEY,
        description=f"The rows of {dataset.table} in this partition: id, text fields, the stored embedding, "
        "content hash, model and enrichment, read in batches.",
    )
    def raw_rows(context: dg.AssetExecutionContext, config: RawRowsConfig) -> dg.Output[Spool]:
        database = res(context).database
        with step_boundary(context, "raw_rows"), database.open(dataset) as store:
            lease = partition_lease(context, dataset, database)
            out = steps.read_rows(store, dataset, lease, context.log, migrate=config.migrate)
        return spool_output(out)

    @asset(
        "detected_placeholders",
        "raw_rows",
        resources=keys.database_only(),
        kinds={"numpy", "parquet"},
        io_manager_key=IO_MANAGER_KEY,
        description="Every row classified with its reason: null, wrong dimension, placeholder (sequential, "
        "constant, zero), non-finite, stale text, other model, missing enrichment, no text, or ok.",
    )
    def detected_placeholders(
        context: dg.AssetExecutionContext, config: DetectionConfig, raw_rows: Spool
    ) -> dg.Output[Spool]:
        database = res(context).database
        with step_boundary(context, "detected_placeholders", inputs=(raw_rows,)), database.open(dataset) as store:
            out = steps.detect_rows(
                store,
                dataset,
                raw_rows,
                context.log,
                force=config.force,
                requeue_failed=config.requeue_failed,
                limit=config.limit,
            )
        return spool_output(out)

    @asset(
        "llm_enrichment",
        "detected_placeholders",
        resources=keys.all,
        kinds={dataset.enrichment.provider, "parquet"},
        io_manager_key=IO_MANAGER_KEY,
        pool=ENRICHMENT_POOL,
        description="Skills, seniority and a summary for each row that needs them, validated against the "
        "schema; a row whose answer fails is recorded with its message and never stops the partition."
        + (
            " The rows' embeddings are requested alongside, into the paid-results cache."
            if embeds_ahead(dataset)
            else ""
        ),
    )
    def llm_enrichment(context: dg.AssetExecutionContext, detected_placeholders: Spool) -> dg.Output[Spool]:
        r = res(context)
        with step_boundary(context, "enrichment", inputs=(detected_placeholders,)):
            out = provider_steps.enrich_rows(
                partition_lease(context, dataset, r.database),
                dataset,
                detected_placeholders,
                lambda: r.enrichment_provider(dataset),
                context.log,
                embedding_provider=lambda: r.embedding_provider(dataset),
            )
        return spool_output(out)

    @asset(
        "embeddings",
        "detected_placeholders",
        "llm_enrichment",
        resources=keys.all,
        kinds={dataset.embedding.provider, "parquet"},
        io_manager_key=IO_MANAGER_KEY,
        pool=EMBEDDING_POOL,
        description=f"{dataset.embedding.dimension}-dim vectors from {dataset.embedding.provider} "
        f"{dataset.embedding.model} for each row that needs one, embedded in batches.",
    )
    def embeddings(
        context: dg.AssetExecutionContext, detected_placeholders: Spool, llm_enrichment: Spool
    ) -> dg.Output[Spool]:
        r = res(context)
        with step_boundary(context, "embeddings", inputs=(detected_placeholders, llm_enrichment)):
            out = provider_steps.embed_rows(
                partition_lease(context, dataset, r.database),
                dataset,
                detected_placeholders,
                llm_enrichment,
                lambda: r.embedding_provider(dataset),
                context.log,
            )
        return spool_output(out)

    @asset(
        "written_table",
        "detected_placeholders",
        "llm_enrichment",
        "embeddings",
        resources=keys.database_only(),
        kinds={store_kind},
        description=f"Results written back to {dataset.target.table or dataset.table} in batches, one "
        "transaction each; only the embedding, enrichment and bookkeeping columns change.",
    )
    def written_table(
        context: dg.AssetExecutionContext,
        detected_placeholders: Spool,
        llm_enrichment: Spool,
        embeddings: Spool,
    ) -> dg.MaterializeResult:
        database = res(context).database
        inputs = (detected_placeholders, llm_enrichment, embeddings)
        with step_boundary(context, "written_table", last=True, inputs=inputs), database.open(dataset) as store:
            out = steps.write_rows(
                store,
                dataset,
                partition_lease(context, dataset, database),
                detected_placeholders,
                llm_enrichment,
                embeddings,
                context.log,
            )
        return dg.MaterializeResult(metadata=out.metadata)

    return [raw_rows, detected_placeholders, llm_enrichment, embeddings, written_table]
