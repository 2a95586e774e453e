"""The optional TOML configuration file shared by agent and aggregator.

One file (named by ``$STACKFLEET_CONFIG``) holds an ``[agent]`` and an ``[aggregator]``
table, so a host's whole configuration can live in one place. Precedence everywhere:
command line > environment > file > defaults.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource

CONFIG_FILE_ENV = "STACKFLEET_CONFIG"


def toml_table(table: str, path: str | None = None) -> dict[str, Any]:
    """The ``[table]`` of the config file, or {} when no file is configured."""
    path = path or os.environ.get(CONFIG_FILE_ENV)
    if not path:
        return {}
    with Path(path).open("rb") as f:
        data = tomllib.load(f)
    section = data.get(table, {})
    if not isinstance(section, dict):
        raise ValueError(f"[{table}] in {path} must be a table")
    return section


def file_source(settings_cls: type[BaseSettings], table: str) -> PydanticBaseSettingsSource:
    """A pydantic-settings source for ``[table]`` of the config file."""
    return InitSettingsSource(settings_cls, init_kwargs=toml_table(table))
