"""The config's models: datasets, their tables, text, providers, limits and automation.

Validated with pydantic when the code location loads, so a wrong key, type or value fails fast with one
message that names the dataset and the key. Secrets (database passwords, API keys) are never read from
the file: the file names environment variables and the resources read them through ``dg.EnvVar``.
"""

from __future__ import annotations

import os
import re
import string
from functools import cached_property
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EnrichmentField = Literal["skills", "seniority", "summary"]
ENRICHMENT_FIELDS: tuple[EnrichmentField, ...] = ("skills", "seniority", "summary")
DatasetName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,40}$")]


class ConfigError(ValueError):
    """The config file is missing, unreadable or invalid; the message names the dataset and key."""


# Identifiers are always quoted in SQL; this only rejects values no database accepts.
Identifier = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[^\x00]+$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnvRef(_Model):
    """A value read from an environment variable, with an optional non-secret default."""

    env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    default: str | None = None

    def resolve(self) -> str:
        value = os.environ.get(self.env)
        if value:
            return value
        if self.default is not None:
            return self.default
        raise ConfigError(f"environment variable {self.env} is not set and has no default")


class TextSpec(_Model):
    """What text of a row is embedded: a list of columns joined, or a ``str.format`` template."""

    columns: list[Identifier] | None = None
    template: str | None = None
    separator: str = "\n\n"
    required_columns: list[Identifier] = Field(
        default_factory=list,
        description="Rows where any of these is empty are skipped as 'no_text'. "
        "Default: a row is skipped only when every field is empty.",
    )

    @model_validator(mode="after")
    def _one_of(self) -> TextSpec:
        if (self.columns is None) == (self.template is None):
            raise ValueError("give exactly one of 'columns' or 'template'")
        if self.columns is not None and not self.columns:
            raise ValueError("'columns' must list at least one column")
        fields = self.fields
        if not fields:
            raise ValueError("the template must reference at least one column, e.g. '{title}'")
        missing = [c for c in self.required_columns if c not in fields]
        if missing:
            raise ValueError(f"required_columns {missing} are not among the text fields {fields}")
        return self

    @cached_property
    def fields(self) -> list[str]:
        if self.columns is not None:
            return list(dict.fromkeys(self.columns))
        names: list[str] = []
        try:
            parsed = list(string.Formatter().parse(self.template or ""))
        except ValueError as exc:
            raise ValueError(f"template is not a valid format string: {exc}") from exc
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or spec or conversion:
                raise ValueError(f"template field {{{name}}} must be a plain column name")
            names.append(name)
        return list(dict.fromkeys(names))


class TargetSpec(_Model):
    """Where results go: the source table itself, or a separate table keyed by the row id."""

    mode: Literal["in_place", "table"] = "in_place"
    table: Identifier | None = None
    schema_name: Identifier | None = Field(default=None, alias="schema")
    id_column: Identifier = "id"
    remove_orphans: bool = Field(
        default=True,
        description="Delete results rows whose source row is gone or filtered out when their partition runs.",
    )

    @model_validator(mode="after")
    def _table_when_separate(self) -> TargetSpec:
        if self.mode == "table" and not self.table:
            raise ValueError("mode 'table' needs 'table': the name of the separate results table")
        if self.mode == "in_place" and self.table:
            raise ValueError("'table' is only used with mode: table")
        return self


class RateLimitSpec(_Model):
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)


class ProviderRetrySpec(_Model):
    """Retries of provider calls by class; the SDKs' own retries are off so every attempt is counted."""

    rate_limit_base_seconds: float = Field(default=5.0, ge=0, description="429: 5s, 10s, 20s... or Retry-After")
    transient_base_seconds: float = Field(default=3.0, ge=0, description="5xx, timeouts: 3s, 6s, 12s...")
    max_attempts: int = Field(default=5, ge=1, le=20)


class BatchSpec(_Model):
    """How ``mode: batch`` submits and waits: the providers' batch APIs answer within 24 hours at a discount."""

    wait_minutes: float = Field(
        default=1440.0,
        ge=0,
        description="How long a run waits for its batches; then it writes what is done and ends, and the next "
        "run of the partition polls the same batches (none is submitted twice).",
    )
    poll_seconds: float = Field(default=30.0, gt=0, description="How often a waiting run asks for its batches' state.")
    price_factor: float = Field(
        default=0.5, gt=0, le=1, description="Batch price as a share of the configured (realtime) prices."
    )
    max_requests: int = Field(
        default=50_000, gt=0, le=50_000, description="Requests per batch (the providers allow 50,000)."
    )
    max_inputs: int = Field(
        default=50_000, gt=0, le=50_000, description="Embedding inputs per batch (OpenAI allows 50,000)."
    )
    max_megabytes: float = Field(
        default=190.0, gt=0, le=200, description="Size of one batch's request file (OpenAI allows 200 MB)."
    )


class ProviderSpec(_Model):
    provider: Literal["offline", "local", "openai", "gemini"] = "offline"
    mode: Literal["realtime", "batch"] = Field(
        default="realtime",
        description="batch: the provider's batch API (OpenAI /v1/batches, Gemini batch mode) at its discount, "
        "answered within 24 hours; realtime: requests at the rate limit.",
    )
    batch: BatchSpec = Field(default_factory=BatchSpec)
    model: str = Field(min_length=1)
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the API key (never the key itself).",
    )
    base_url: str | None = None
    max_in_flight: int = Field(default=8, gt=0, le=512)
    rate_limit: RateLimitSpec = Field(default_factory=RateLimitSpec)
    retry: ProviderRetrySpec = Field(default_factory=ProviderRetrySpec)
    timeout_seconds: float = Field(default=60.0, gt=0)
    price_per_million_input_tokens: float = Field(default=0.0, ge=0)
    price_per_million_output_tokens: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _batch_needs_api(self) -> ProviderSpec:
        if self.mode == "batch" and self.provider not in ("openai", "gemini"):
            raise ValueError(f"mode: batch needs provider openai or gemini (a batch API), not {self.provider!r}")
        return self

    @property
    def price_factor(self) -> float:
        """What the configured prices are multiplied by for this mode."""
        return self.batch.price_factor if self.mode == "batch" else 1.0

    @field_validator("base_url")
    @classmethod
    def _no_credentials_in_url(cls, value: str | None) -> str | None:
        if value and urlsplit(value).password:
            raise ValueError("must not contain credentials; put the key in the environment")
        return value

    @property
    def resolved_api_key_env(self) -> str | None:
        if self.api_key_env:
            return self.api_key_env
        return {"openai": "OPENAI_API_KEY", "gemini": "GEMINI_API_KEY"}.get(self.provider)


class EmbeddingSpec(ProviderSpec):
    model: str = "offline-hash-v1"
    column: Identifier = "embedding"
    dimension: int = Field(gt=0, le=16000)
    batch_size: int = Field(default=256, gt=0, le=2048, description="Inputs per provider request.")
    include_enrichment: bool = Field(
        default=False, description="Append the enrichment's summary and skills to the embedded text."
    )
    task_type: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _local_model(cls, data: object) -> object:
        """``provider: local`` names its model unless told: WordLlama's, shipped in the wheel."""
        if isinstance(data, dict) and data.get("provider") == "local" and "model" not in data:
            return {**data, "model": "wordllama-l2-supercat"}
        return data


class EnrichmentSpec(ProviderSpec):
    enabled: bool = False
    expected_output_tokens: int = Field(default=200, gt=0, description="Reserved per request in the budget.")
    model: str = "offline-rules-v1"
    fields: list[EnrichmentField] = Field(default_factory=lambda: list(ENRICHMENT_FIELDS))
    columns: dict[EnrichmentField, Identifier] = Field(default_factory=dict)
    batch_size: int = Field(default=16, gt=0, le=1000, description="Rows handed to the provider at once.")

    @model_validator(mode="after")
    def _columns_for_fields(self) -> EnrichmentSpec:
        if self.provider == "local":
            raise ValueError("provider 'local' is an embedder; enrichment takes offline, openai or gemini")
        unknown = set(self.columns) - set(self.fields)
        if unknown:
            raise ValueError(f"columns given for fields that are not enabled: {sorted(unknown)}")
        if not self.fields:
            raise ValueError("'fields' must list at least one of skills, seniority, summary")
        return self

    def column_for(self, field: str) -> str:
        renamed = {str(k): v for k, v in self.columns.items()}
        return renamed.get(field, field)


class PartitioningSpec(_Model):
    """How a dataset's rows are cut into partitions (one run each).

    ``id_range``: integer ids, ``width`` ids per partition. ``hash``: any key type (UUID, text), ``buckets``
    partitions by a stable hash of the key's text. ``time``: Dagster's daily, weekly or monthly partitions
    of a timestamp ``column`` from ``start``. ``archive``: one partition per value of ``archive_column``.
    """

    kind: Literal["id_range", "hash", "time", "archive"] = "id_range"
    width: int = Field(default=10_000, gt=0, le=10_000_000_000)
    buckets: int = Field(default=16, ge=1, le=4096)
    column: Identifier | None = None
    granularity: Literal["day", "week", "month"] = "day"
    start: str | None = Field(default=None, description="First time partition, as YYYY-MM-DD (time partitions).")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> PartitioningSpec:
        given = self.model_fields_set
        if self.kind == "time":
            if not self.column or not self.start:
                raise ValueError("kind 'time' needs 'column' (a timestamp column) and 'start' (YYYY-MM-DD)")
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.start):
                raise ValueError(f"start {self.start!r} is not a date like 2024-01-31")
        else:
            extra = sorted(given & {"column", "granularity", "start"})
            if extra:
                raise ValueError(f"{', '.join(extra)} only apply to kind 'time'")
        if "buckets" in given and self.kind != "hash":
            raise ValueError("'buckets' only applies to kind 'hash'")
        if "width" in given and self.kind != "id_range":
            raise ValueError("'width' only applies to kind 'id_range'")
        return self


class ChangeTrackingSpec(_Model):
    """How edited rows are found without reading the whole table.

    ``updated_at_column``: the sensor's cursor is (updated_at, id); rows changed since are run. ``trigger``
    (Postgres): ``migrate`` installs a trigger that queues the key of every inserted, deleted or edited row
    (edits of the text columns, the archive column and ``watch_columns``) in ``backfill_queue``; the sensor
    drains it.
    """

    updated_at_column: Identifier | None = None
    trigger: bool = False
    watch_columns: list[Identifier] = Field(
        default_factory=list,
        description="More columns whose edits queue a row (trigger only), e.g. those the row_filter reads.",
    )

    @model_validator(mode="after")
    def _one_way(self) -> ChangeTrackingSpec:
        if self.updated_at_column and self.trigger:
            raise ValueError("give either updated_at_column or trigger: true, not both")
        if self.watch_columns and not self.trigger:
            raise ValueError("watch_columns only applies with trigger: true")
        return self


class BookkeepingColumns(_Model):
    """Columns the pipeline owns besides the embedding and enrichment fields."""

    content_hash: Identifier = "content_hash"
    model: Identifier = "embedding_model"
    embedded_at: Identifier = "embedded_at"
    enriched_at: Identifier = "enriched_at"
    enrichment_hash: Identifier = "enrichment_hash"  # the text the enrichment was made from, apart from the embedding's
    enrichment_model: Identifier = "enrichment_model"


class ScheduleSpec(_Model):
    enabled: bool = True
    cron: str = "0 */6 * * *"
    max_runs_per_tick: int = Field(default=10, gt=0)


class ChecksSpec(_Model):
    max_failure_rate: float = Field(
        default=0.01, ge=0, le=1, description="The failure_rate check warns above this share of rows with text."
    )


class SensorSpec(_Model):
    enabled: bool = True
    interval_seconds: int = Field(default=60, ge=5)


class CacheSpec(_Model):
    """Where paid results are kept, keyed by (provider, model, dimension, content hash)."""

    backend: Literal["database", "redis", "none"] = "database"
    redis_url: str | EnvRef | None = None
    ttl_days: float = Field(default=30.0, gt=0)
    key_prefix: str = Field(
        default="backfill:", min_length=1, description="Prefix of every Redis key, to share one Redis safely."
    )
    claim_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Runs at once pay for a text once: one claims it, the others wait for its answer. A claim "
        "not renewed for this long (its run was killed) lapses, and another run pays for the text.",
    )

    @model_validator(mode="after")
    def _redis_url(self) -> CacheSpec:
        if self.backend == "redis" and self.redis_url is None:
            raise ValueError("backend 'redis' needs redis_url (e.g. {env: REDIS_URL})")
        return self


class RateLimiterSpec(_Model):
    """Where the requests/tokens-per-minute budget is shared between processes."""

    backend: Literal["database", "redis", "local"] = "database"
    redis_url: str | EnvRef | None = None
    burst_seconds: float | None = Field(
        default=None,
        gt=0,
        description="How many seconds of budget may be spent at once. Unset: 1 s at first, then what the "
        "server's x-ratelimit-remaining-* headers show its bucket holds (at most 60 s), halved by a 429.",
    )

    @model_validator(mode="after")
    def _redis_url(self) -> RateLimiterSpec:
        if self.backend == "redis" and self.redis_url is None:
            raise ValueError("backend 'redis' needs redis_url (e.g. {env: REDIS_URL})")
        return self


class RetrySpec(_Model):
    """Dagster's step retries: exponential backoff with jitter, for transient failures."""

    max_retries: int = Field(default=3, ge=0, le=20)
    delay_seconds: float = Field(default=2.0, ge=0)


class DatasetConfig(_Model):
    database_url: str | EnvRef
    database_kind: Literal["sqlite", "postgres"] | None = Field(
        default=None,
        description="The kind of database behind an {env: VAR} URL, for the UI's kind tags; by default the "
        "literal URL's (or the variable's default's) scheme, else postgres.",
    )
    table: Identifier
    schema_name: Identifier | None = Field(default=None, alias="schema")
    id_column: Identifier = "id"
    text: TextSpec
    row_filter: str | None = Field(
        default=None,
        description="Trusted SQL boolean expression over the source table's columns; the only raw SQL.",
    )
    archive_column: Identifier | None = None
    target: TargetSpec = Field(default_factory=TargetSpec)
    embedding: EmbeddingSpec
    enrichment: EnrichmentSpec = Field(default_factory=EnrichmentSpec)
    partitioning: PartitioningSpec = Field(default_factory=PartitioningSpec)
    change_tracking: ChangeTrackingSpec = Field(default_factory=ChangeTrackingSpec)
    bookkeeping: BookkeepingColumns = Field(default_factory=BookkeepingColumns)
    unhashed_rows: Literal["trust", "redo"] = Field(
        default="trust",
        description="Rows holding a valid embedding but no content hash (embedded before this tool): "
        "'trust' keeps them, 'redo' re-embeds them.",
    )
    read_batch_size: int = Field(default=2_000, gt=0)
    rows_in_memory: int = Field(
        default=1_000,
        ge=100,
        description="Rows a step holds at once (detection, provider calls, the write); a partition of any width "
        "streams through the steps in windows of this many rows, so a run's memory does not grow with it.",
    )
    write_batch_size: int = Field(default=1_000, gt=0)
    write_concurrency: int = Field(
        default=3, ge=1, le=16, description="Batches written at once, each on its own connection (Postgres)."
    )
    failure_cooldown_hours: float = Field(default=24.0, ge=0)
    lock_timeout_seconds: float = Field(
        default=30.0, gt=0, description="How long a statement waits for a lock another session holds."
    )
    statement_timeout_seconds: float = Field(default=900.0, gt=0, description="How long any one statement may run.")
    lease_seconds: float = Field(
        default=60.0,
        ge=2,
        description="A partition's lease expires when its run has not renewed it for this long (a killed run).",
    )
    stop_grace_seconds: float = Field(
        default=10.0,
        ge=0,
        description="After Ctrl+C, SIGTERM or Terminate, how long requests in flight may still take to answer.",
    )
    retry: RetrySpec = Field(default_factory=RetrySpec)
    cache: CacheSpec = Field(default_factory=CacheSpec)
    rate_limiter: RateLimiterSpec = Field(default_factory=RateLimiterSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    sensor: SensorSpec = Field(default_factory=SensorSpec)
    checks: ChecksSpec = Field(default_factory=ChecksSpec)

    @field_validator("database_url")
    @classmethod
    def _no_password_in_file(cls, value: str | EnvRef) -> str | EnvRef:
        if isinstance(value, str):
            parts = urlsplit(value)
            if parts.scheme not in ("sqlite", "postgresql", "postgres", "postgresql+psycopg"):
                raise ValueError(f"unsupported scheme {parts.scheme!r}: use sqlite:/// or postgresql://")
            if parts.password:
                raise ValueError(
                    "must not hold a password: write `database_url: {env: MY_DATABASE_URL}` "
                    "and set the URL in that environment variable"
                )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DatasetConfig:
        if self.partitioning.kind == "archive" and not self.archive_column:
            raise ValueError("partitioning.kind 'archive' needs 'archive_column'")
        if self.change_tracking.trigger and self.store_kind != "postgres":
            raise ValueError("change_tracking.trigger needs Postgres; on SQLite use updated_at_column")
        if self.embedding.include_enrichment and not self.enrichment.enabled:
            raise ValueError("embedding.include_enrichment needs enrichment.enabled: true")
        owned = self.result_columns
        text_overlap = set(owned) & set(self.text.fields)
        if self.target.mode == "in_place" and text_overlap:
            raise ValueError(f"result columns {sorted(text_overlap)} are also text fields")
        if len(set(owned)) != len(owned):
            raise ValueError(f"result columns must be distinct, got {owned}")
        return self

    @property
    def enrichment_columns(self) -> dict[str, str]:
        if not self.enrichment.enabled:
            return {}
        return {f: self.enrichment.column_for(f) for f in self.enrichment.fields}

    @property
    def result_columns(self) -> list[str]:
        """Every column the pipeline writes; nothing else is ever changed."""
        cols = [
            self.embedding.column,
            self.bookkeeping.content_hash,
            self.bookkeeping.model,
            self.bookkeeping.embedded_at,
        ]
        if self.enrichment.enabled:
            books = self.bookkeeping
            cols += [
                *self.enrichment_columns.values(),
                books.enriched_at,
                books.enrichment_hash,
                books.enrichment_model,
            ]
        return cols

    def database_url_value(self) -> str:
        """The URL itself, read from the environment when the config names a variable (at run time only)."""
        return self.database_url if isinstance(self.database_url, str) else self.database_url.resolve()

    @property
    def store_kind(self) -> Literal["sqlite", "postgres"]:
        """Which store the dataset uses, from the config alone (never from a secret's value)."""
        if self.database_kind is not None:
            return self.database_kind
        url = self.database_url if isinstance(self.database_url, str) else self.database_url.default
        return "sqlite" if url and urlsplit(url).scheme == "sqlite" else "postgres"


LOCAL_EXECUTORS = ("in_process", "multiprocess")
OBJECT_STORES = ("s3", "gs", "gcs", "az", "abfs", "abfss")


class ExecutionSpec(_Model):
    """Where a run's steps execute and where they leave their intermediates for each other.

    ``executor``: ``in_process`` (default: a partition's steps form a chain, so one process is fastest),
    ``multiprocess``, or the one a deployment names as ``module:attribute``, e.g.
    ``dagster_celery:celery_executor``, ``dagster_k8s:k8s_job_executor``, ``dagster_docker:docker_executor``.
    ``intermediates``: an fsspec URL every step reaches (``s3://bucket/prefix``, ``gs://…``, ``az://…``,
    ``file:///shared/disk``); by default the Dagster instance's local storage directory.
    """

    executor: str = Field(default="in_process", pattern=r"^(in_process|multiprocess|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
    executor_config: dict[str, Any] = Field(
        default_factory=dict,
        description="The executor's own config, as its docs give it (Celery: broker, backend, config_source); "
        "{env: VAR} values are read by Dagster when a run starts.",
    )
    intermediates: str | EnvRef | None = None

    @property
    def intermediates_url(self) -> str | None:
        """The URL itself (not a secret: read when the code location loads)."""
        if isinstance(self.intermediates, EnvRef):
            return os.environ.get(self.intermediates.env) or self.intermediates.default
        return self.intermediates

    @model_validator(mode="after")
    def _reachable_by_every_step(self) -> ExecutionSpec:
        if self.executor in LOCAL_EXECUTORS:
            return self
        url = self.intermediates_url
        if not url or urlsplit(url).scheme not in OBJECT_STORES:
            raise ValueError(
                f"executor {self.executor!r} runs steps on other machines, which exchange intermediates only "
                f"through storage all of them reach; set execution.intermediates to an object store URL "
                f"(s3://bucket/prefix, gs://…, az://…), not {url or 'the local default'!r}"
            )
        return self


class BackfillConfig(_Model):
    datasets: dict[DatasetName, DatasetConfig] = Field(min_length=1)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
