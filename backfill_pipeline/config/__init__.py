"""The backfill config: one YAML document declaring one or more datasets.

Validated with pydantic when the code location loads, so a wrong key, type or value fails fast with one
message that names the dataset and the key. Secrets (database passwords, API keys) are never read from
the file: the file names environment variables and the resources read them through ``dg.EnvVar``.
"""

from .loading import CONFIG_ENV_VAR, demo_config_path, load_config, parse_config
from .models import (
    ENRICHMENT_FIELDS,
    BackfillConfig,
    BatchSpec,
    CacheSpec,
    ConfigError,
    DatasetConfig,
    EmbeddingSpec,
    EnrichmentSpec,
    EnvRef,
    ProviderRetrySpec,
    ProviderSpec,
    RateLimiterSpec,
    RateLimitSpec,
    TextSpec,
)

__all__ = [
    "CONFIG_ENV_VAR",
    "ENRICHMENT_FIELDS",
    "BackfillConfig",
    "BatchSpec",
    "CacheSpec",
    "ConfigError",
    "DatasetConfig",
    "EmbeddingSpec",
    "EnrichmentSpec",
    "EnvRef",
    "ProviderRetrySpec",
    "ProviderSpec",
    "RateLimitSpec",
    "RateLimiterSpec",
    "TextSpec",
    "demo_config_path",
    "load_config",
    "parse_config",
]
