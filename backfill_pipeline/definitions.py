"""The code location: every component under ``defs/`` (here, one ``EmbeddingBackfill``)."""

import logging
from pathlib import Path

import dagster as dg


class _QuietLocationName(logging.Filter):
    """`dagster ... -m backfill_pipeline.definitions` names the location after the module, not after the
    project; Dagster then warns once per component that the names differ. Nothing here depends on the
    name (the project has no app-managed components), so that one warning is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "this code location is registered under" not in record.getMessage()


logging.getLogger("dagster.components.core.component_tree").addFilter(_QuietLocationName())


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
