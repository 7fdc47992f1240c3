"""Resolve an experiment's settings: the training defaults with its overrides, checked against
the schema's rules for training keys, so a typo in an experiment is caught before any job runs."""

from __future__ import annotations

import copy

import jsonschema
import yaml

from .errors import ConfigError


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "target":
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def experiment_settings(config: dict, name: str, schema_path) -> dict:
    """``config`` is the validated config (training defaults filled in)."""
    if name not in config["experiments"]:
        raise ConfigError(f"experiments: no experiment named {name!r}; there are {sorted(config['experiments'])}")
    settings = deep_merge(config["training"], config["experiments"][name] or {})
    with open(schema_path) as fh:
        training_schema = yaml.safe_load(fh)["properties"]["training"]
    errors = sorted(jsonschema.Draft202012Validator(training_schema).iter_errors(settings), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.path)
        raise ConfigError(f"experiments.{name}{'.' + where if where else ''}: {first.message}")
    return settings
