"""Resources hold what comes from the environment: a dataset's database URL and its providers' keys.

Behaviour (tables, columns, models, limits) lives in the config; secrets arrive only at run time. A
resource keeps the *name* of the variable and reads it when a run, sensor tick or schedule tick opens the
database or builds a provider, so loading the code location reads no secret, the Dagster UI shows only
the variable's name, and an unset variable is one clear sentence instead of a config traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import dagster as dg

from ..config import ConfigError, DatasetConfig, EnvRef, ProviderSpec
from ..providers import DEFAULT_KEY_ENV, api_key_from, build_embedding_provider, build_enrichment_provider
from ..providers.base import EmbeddingProvider, EnrichmentProvider
from ..stores import Store, open_store


class DatabaseResource(dg.ConfigurableResource):
    """A dataset's database: a literal URL (SQLite paths), or the environment variable that holds it."""

    dataset: str
    url: str | None = None
    url_env: str | None = None
    default_url: str | None = None

    def resolved_url(self) -> str:
        if self.url:
            return self.url
        value = os.environ.get(self.url_env, "") if self.url_env else ""
        if value.strip():
            return value.strip()
        if self.default_url:
            return self.default_url
        raise ConfigError(
            f"dataset '{self.dataset}': environment variable {self.url_env} is not set; it holds the database "
            "URL (config key database_url), e.g. postgresql://user:password@host:5432/db"
        )

    def open(self, dataset: DatasetConfig) -> Store:
        return open_store(self.dataset, dataset, self.resolved_url())


class ProviderKeyResource(dg.ConfigurableResource):
    """The name of the variable holding a provider's API key, and an optional base URL."""

    api_key_env: str | None = None
    base_url: str | None = None
    setting: str = "embedding.api_key_env"

    def api_key(self, default_env: str | None) -> str | None:
        """The key, or None to let the provider look in its SDK's usual variables."""
        return api_key_from(self.api_key_env, default_env, self.setting)


def database_resource(name: str, dataset: DatasetConfig) -> DatabaseResource:
    url = dataset.database_url
    if isinstance(url, EnvRef):
        return DatabaseResource(dataset=name, url_env=url.env, default_url=url.default)
    return DatabaseResource(dataset=name, url=url)


def provider_key_resource(spec: ProviderSpec, stage: str) -> ProviderKeyResource:
    env = None if spec.provider in ("offline", "local") else spec.resolved_api_key_env
    return ProviderKeyResource(api_key_env=env, base_url=spec.base_url, setting=f"{stage}.api_key_env")


def _with_base_url(spec: Any, key: ProviderKeyResource) -> Any:
    if key.base_url and key.base_url != spec.base_url:
        return spec.model_copy(update={"base_url": key.base_url})
    return spec


@dataclass(frozen=True)
class DatasetResources:
    """A dataset's resources as a run, check, sensor or schedule receives them from Dagster."""

    database: DatabaseResource
    embedding_key: ProviderKeyResource
    enrichment_key: ProviderKeyResource

    def embedding_provider(self, dataset: DatasetConfig) -> EmbeddingProvider:
        spec = _with_base_url(dataset.embedding, self.embedding_key)
        return build_embedding_provider(spec, self.embedding_key.api_key(DEFAULT_KEY_ENV.get(spec.provider)))

    def enrichment_provider(self, dataset: DatasetConfig) -> EnrichmentProvider:
        spec = _with_base_url(dataset.enrichment, self.enrichment_key)
        return build_enrichment_provider(spec, self.enrichment_key.api_key(DEFAULT_KEY_ENV.get(spec.provider)))


@dataclass(frozen=True)
class ResourceKeys:
    """The resource keys of one dataset: each dataset has its own database and keys."""

    database: str
    embedding_key: str
    enrichment_key: str

    @classmethod
    def of(cls, name: str) -> ResourceKeys:
        return cls(f"{name}_database", f"{name}_embedding_key", f"{name}_enrichment_key")

    @property
    def all(self) -> set[str]:
        return {self.database, self.embedding_key, self.enrichment_key}

    def database_only(self) -> set[str]:
        return {self.database}

    def resolve(self, resources: Any) -> DatasetResources:
        """Typed access to the resources Dagster injected under these keys."""
        found = {
            "database": getattr(resources, self.database),
            "embedding_key": getattr(resources, self.embedding_key, None) or ProviderKeyResource(),
            "enrichment_key": getattr(resources, self.enrichment_key, None) or ProviderKeyResource(),
        }
        if not isinstance(found["database"], DatabaseResource):
            raise TypeError(f"resource {self.database} is {type(found['database']).__name__}, not DatabaseResource")
        return DatasetResources(**found)


def dataset_resources(name: str, dataset: DatasetConfig) -> dict[str, dg.ConfigurableResource]:
    keys = ResourceKeys.of(name)
    return {
        keys.database: database_resource(name, dataset),
        keys.embedding_key: provider_key_resource(dataset.embedding, "embedding"),
        keys.enrichment_key: provider_key_resource(dataset.enrichment, "enrichment"),
    }
