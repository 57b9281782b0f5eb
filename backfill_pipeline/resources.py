"""Resources hold what comes from the environment: the database URL and the providers' keys.

Behaviour (tables, columns, models, limits) lives in the config file; secrets only ever arrive through
``dg.EnvVar``, so the Dagster UI shows the variable's name and never its value.
"""

import os

import dagster as dg

from .config import DatasetConfig, EnvRef, ProviderSpec
from .providers import build_embedding_provider, build_enrichment_provider
from .providers.base import EmbeddingProvider, EnrichmentProvider
from .stores import Store, open_store


class DatabaseResource(dg.ConfigurableResource):
    """A dataset's database connection URL."""

    url: str

    def open(self, name: str, dataset: DatasetConfig) -> Store:
        return open_store(name, dataset, self.url)


class ProviderKeyResource(dg.ConfigurableResource):
    """An API key (from the environment) and an optional base URL for OpenAI-compatible servers."""

    api_key: str | None = None
    base_url: str | None = None


def database_resource(dataset: DatasetConfig) -> DatabaseResource:
    url = dataset.database_url
    if isinstance(url, EnvRef):
        if os.environ.get(url.env) or url.default is None:
            return DatabaseResource(url=dg.EnvVar(url.env))
        return DatabaseResource(url=url.default)
    return DatabaseResource(url=url)


def provider_key_resource(spec: ProviderSpec) -> ProviderKeyResource:
    env = spec.resolved_api_key_env
    if spec.provider == "offline" or env is None:
        return ProviderKeyResource(base_url=spec.base_url)
    return ProviderKeyResource(api_key=dg.EnvVar(env), base_url=spec.base_url)


def embedding_provider(dataset: DatasetConfig, key: ProviderKeyResource) -> EmbeddingProvider:
    spec = dataset.embedding
    if key.base_url and key.base_url != spec.base_url:
        spec = spec.model_copy(update={"base_url": key.base_url})
    return build_embedding_provider(spec, key.api_key)


def enrichment_provider(dataset: DatasetConfig, key: ProviderKeyResource) -> EnrichmentProvider:
    spec = dataset.enrichment
    if key.base_url and key.base_url != spec.base_url:
        spec = spec.model_copy(update={"base_url": key.base_url})
    return build_enrichment_provider(spec, key.api_key)


def resource_keys(name: str) -> dict[str, str]:
    return {
        "database": f"{name}_database",
        "embedding_key": f"{name}_embedding_key",
        "enrichment_key": f"{name}_enrichment_key",
    }


def dataset_resources(name: str, dataset: DatasetConfig) -> dict[str, dg.ConfigurableResource]:
    keys = resource_keys(name)
    return {
        keys["database"]: database_resource(dataset),
        keys["embedding_key"]: provider_key_resource(dataset.embedding),
        keys["enrichment_key"]: provider_key_resource(dataset.enrichment),
    }
