"""A run's configuration from its YAML file: `load_config(path, overrides)`.

Reading the file, applying `key=value` overrides (`apply_overrides`) and completing the model section
from `model.init_from`'s model directory (`with_init_source`) happen here; what a valid config is,
and `validate`, are `sleepscale.config`'s (which imports nothing of sleepscale).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sleepscale.config import FREE_OF_SOURCE, STAGE_BOUNDARY, Config, ConfigError, ModelConfig, validate


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b.c=value` sets data['a']['b']['c'] to value parsed as YAML (so 4 is an int, [0, 2] a list)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} must look like key=value, e.g. sleep.passes=4")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if isinstance(node, list):  # an item of a list of sections: `stages.0.steps=2`
                child = node[_list_index(node, part, override)]
            else:
                child = node.setdefault(part, {})
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"override {override!r}: {part} is a value, not a section")
            node = child
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r}: value is not valid YAML ({error.problem})") from None
        node[_list_index(node, leaf, override) if isinstance(node, list) else leaf] = value
    return data


def _list_index(items: list, part: str, override: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(
            f"override {override!r}: {part} is not an index of a list of {len(items)} (0 to {len(items) - 1})"
        )
    return int(part)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with sections model and sleep")
    return validate(with_init_source(apply_overrides(data, list(overrides))))


def with_init_source(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with its model section completed from `model.init_from`'s, after checking that every
    architecture field the config gives agrees with the source (pipeline '|' marks may be added)."""
    model = data.get("model")
    if not isinstance(model, dict) or not model.get("init_from"):
        return data
    # Model directories are read with torch (~1.5 s): imported only when a config names one, so that
    # `sleepscale config` and `--help` stay light.
    from sleepscale.convert.model_dir import ModelDirError, read_description

    try:
        source = ModelConfig(**read_description(model["init_from"])["model"]).model_dump(mode="json")
    except ModelDirError as error:
        raise ConfigError(f"model.init_from: {error}") from None
    for key, value in model.items():
        if key in FREE_OF_SOURCE:
            continue
        if key == "pattern" and isinstance(value, str):
            value = value.replace(STAGE_BOUNDARY, "")
        found = _disagreement(key, value, source.get(key))
        if found:
            field, given, theirs = found
            raise ConfigError(
                f"model.{field}: the config gives {given!r}, model.init_from {model['init_from']} has "
                f"{theirs!r}; remove it from the config (it is filled from the source) or make it agree"
            )
    # Given fields agree with the source's; take the source's (complete) section, the free fields and '|' marks
    # as given.
    free = {key: model[key] for key in (*FREE_OF_SOURCE, "pattern") if key in model}
    return {**data, "model": {**source, **free}}


def _disagreement(key: str, given: Any, source: Any) -> tuple[str, Any, Any] | None:
    """(dotted field, given value, source value) of the first given model value that differs from
    the source's, or None."""
    if isinstance(given, dict) and isinstance(source, dict):
        for sub, value in given.items():
            found = _disagreement(f"{key}.{sub}", value, source.get(sub))
            if found:
                return found
        return None
    if isinstance(given, (list, tuple)) and isinstance(source, (list, tuple)):
        given, source = list(given), list(source)
    return None if given == source else (key, given, source)
