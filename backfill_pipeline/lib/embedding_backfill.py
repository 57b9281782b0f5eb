"""``EmbeddingBackfill``: the backfill as a Dagster component, for a ``defs.yaml`` in any dg project.

```yaml
type: backfill_pipeline.EmbeddingBackfill
attributes:
  config_file: "{{ env.BACKFILL_CONFIG }}"   # a config file, or:
  datasets:                                   # the same datasets, written inline
    jobs: {database_url: {env: JOBS_DATABASE_URL}, table: jobs, text: {columns: [title]}, ...}
```

Inline datasets are validated exactly like a config file (one message naming the dataset and the key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from ..config import CONFIG_ENV_VAR, BackfillConfig, ConfigError, load_config, parse_config
from .factory import backfill_definitions

EXAMPLE_DATASET = {
    "database_url": {"env": "JOBS_DATABASE_URL"},
    "table": "jobs",
    "id_column": "id",
    "text": {"template": "{title} at {company}\n\n{description}", "required_columns": ["description"]},
    "embedding": {"provider": "offline", "model": "offline-hash-v1", "dimension": 768},
    "enrichment": {"enabled": False},
    "partitioning": {"kind": "id_range", "width": 10000},
}


class EmbeddingBackfillScaffolder(dg.Scaffolder):
    """`dg scaffold defs backfill_pipeline.EmbeddingBackfill NAME` writes one example dataset to edit."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        dg.scaffold_component(request, {"datasets": {"jobs": EXAMPLE_DATASET}})


@dg.scaffold_with(EmbeddingBackfillScaffolder)
class EmbeddingBackfill(dg.Component, dg.Resolvable, dg.Model):
    """Backfills and maintains LLM enrichment and embeddings for the rows of database tables.

    Give either ``config_file`` (a backfill config YAML) or ``datasets`` (the same mapping inline).
    """

    config_file: str | None = Field(
        default=None,
        description=f"Path of a backfill config file, e.g. '{{{{ env.{CONFIG_ENV_VAR} }}}}'; a relative path is "
        "looked up beside this defs.yaml, then in the working directory.",
    )
    datasets: dict[str, Any] | None = Field(
        default=None, description="Datasets by name, each as in a config file's `datasets:` mapping."
    )
    execution: dict[str, Any] | None = Field(
        default=None,
        description="With inline datasets: the executor and the intermediates URL, as a config file's `execution:`.",
    )

    def backfill_config(self, component_dir: Path | None = None) -> BackfillConfig:
        if self.datasets is not None and self.config_file:
            raise ConfigError("EmbeddingBackfill: give either config_file or datasets, not both")
        if self.datasets is not None:
            document = {"datasets": self.datasets, **({"execution": self.execution} if self.execution else {})}
            return parse_config(document, "(EmbeddingBackfill attributes)")
        if self.execution is not None:
            raise ConfigError("EmbeddingBackfill: with config_file, write execution: in that file")
        if not self.config_file or not self.config_file.strip():
            raise ConfigError(
                "EmbeddingBackfill: config_file is empty: "
                f"set {CONFIG_ENV_VAR} to your backfill config file (or give `datasets:` inline)"
            )
        path = Path(self.config_file.strip())
        if not path.is_absolute() and component_dir is not None and (component_dir / path).exists():
            path = component_dir / path
        return load_config(path)

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return backfill_definitions(self.backfill_config(context.path))
