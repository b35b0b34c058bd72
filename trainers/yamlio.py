"""Interim: replaced by the reliability branch's bounded, strict YAML loader."""
from __future__ import annotations

from pathlib import Path

import yaml

from trainers.errors import ConfigError


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "file not found.", "Check the path.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {exc}".replace("\n", " "), "Fix the syntax.") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"expected a mapping at the top level, got {type(data).__name__}.")
    return data


def parse_set_value(raw: str, where: str):
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw
