"""Reading and validating a config file, with one readable message per mistake."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

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
    config = parse_config(_yaml(text, str(path)), str(path))
    if path.resolve() == demo_config_path().resolve():
        return config  # the demo's folder is inside the installed package: its database stays in the working folder
    return anchored(config, path.resolve().parent)


def _anchored_url(url: str, folder: Path) -> str:
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or parts.netloc:
        return url
    relative = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not relative or Path(relative).is_absolute():
        return url
    return f"sqlite:///{folder / relative}"


def anchored(config: BackfillConfig, folder: Path) -> BackfillConfig:
    """Relative ``sqlite:///`` paths written in a config file are relative to that file's folder, so every
    command, the UI and the daemon find the same database wherever they start (an environment variable's
    value is the process's own, relative to its working folder)."""
    datasets = {}
    for name, dataset in config.datasets.items():
        url = dataset.database_url
        if isinstance(url, str):
            url = _anchored_url(url, folder)
        elif url.default:
            url = url.model_copy(update={"default": _anchored_url(url.default, folder)})
        datasets[name] = dataset.model_copy(update={"database_url": url})
    return config.model_copy(update={"datasets": datasets})


def _yaml(text: str, source: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"backfill config {source} is not valid YAML: {' '.join(str(exc).split())}") from None
