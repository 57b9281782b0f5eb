"""Reading and validating a config file, with one readable message per mistake."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from .models import BackfillConfig, ConfigError

CONFIG_ENV_VAR = "BACKFILL_CONFIG"
DEMO_CONFIG_NAME = "demo_config.yaml"


def _location(loc: tuple) -> tuple[str | None, str]:
    parts = [str(p) for p in loc]
    if len(parts) >= 2 and parts[0] == "datasets":
        # pydantic inserts the union member's tag ("str", "EnvRef") into the path; it is not a key.
        key = [p for p in parts[2:] if p not in ("str", "EnvRef")]
        return parts[1], ".".join(key) or "(dataset)"
    return None, ".".join(parts) or "(top level)"


def _describe(error: ErrorDetails) -> str:
    dataset, key = _location(error["loc"])
    msg = error["msg"].removeprefix("Value error, ")
    if key == "[key]":
        return f"dataset name '{dataset}': {msg} (lower case letters, digits and underscores)"
    if error["type"] == "extra_forbidden":
        msg = "unknown key (check its spelling and level)"
    where = f"dataset '{dataset}', key '{key}'" if dataset else f"key '{key}'"
    return f"{where}: {msg}"


def parse_config(data: object, source: str = "<config>") -> BackfillConfig:
    """Validate a loaded YAML document, turning pydantic's report into one readable message."""
    try:
        return BackfillConfig.model_validate(data)
    except ValidationError as exc:
        lines = sorted({_describe(e) for e in exc.errors()})
        raise ConfigError(f"invalid backfill config {source}:\n  " + "\n  ".join(lines)) from None


def demo_config_path() -> Path:
    """The built-in demo config: a local SQLite file and the offline providers."""
    return Path(str(resources.files("backfill_pipeline.config").joinpath(DEMO_CONFIG_NAME)))


def load_config(path: Path | str | None = None) -> BackfillConfig:
    """Load the config from ``path``, else ``$BACKFILL_CONFIG``; there is no silent default."""
    if not path:
        path = os.environ.get(CONFIG_ENV_VAR) or None
    if not path:
        raise ConfigError(
            f"no backfill config: set {CONFIG_ENV_VAR} to your config file (or pass --config FILE); "
            f"for the built-in demo use `backfill-pipeline demo` or {CONFIG_ENV_VAR}={demo_config_path()}"
        )
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read backfill config {path}: {exc.strerror or exc}") from None
    return parse_config(_yaml(text, str(path)), str(path))


def _yaml(text: str, source: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"backfill config {source} is not valid YAML: {' '.join(str(exc).split())}") from None
