"""Reading parameters: params.yaml, overlay files, a JSON of sections and `--set` assignments,
merged into one mapping of sections that `config.section` and `config.validate` type and check.

Without a file named, ./params.yaml serves in a project folder, and the copy the package ships
anywhere else (the project's params.yaml links to it), so commands that only read trained runs
work from any folder.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Mapping

import yaml

from .config import ConfigError

PACKAGED_PARAMS = Path(__file__).with_name("params.yaml")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read parameter file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: dict, overlay: Mapping, where: str) -> dict:
    """Deep-merge `overlay` into a copy of `base`. Overlays may only set keys the base has."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if base and key not in base:
            raise ConfigError(f"unknown key '{key}' in {where} (known: {', '.join(map(str, base))})")
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, f"{where}.{key}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_assignment(text: str) -> dict:
    """`data.size=128` -> {"data": {"size": 128}}; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        nested = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    for name in reversed(key.split(".")):
        nested = {name: nested}
    return nested


def default_params_file() -> Path:
    """./params.yaml in a project folder; anywhere else the copy shipped in the package (the
    project's params.yaml links to it), so commands that only read trained runs work anywhere."""
    local = Path("params.yaml")
    return local if local.exists() else PACKAGED_PARAMS


def load_params(
    files: list[str | os.PathLike] | None = None,
    overrides: list[str] = (),
    config_json: str | None = None,
) -> dict:
    """params.yaml, then each overlay file, then a JSON of sections, then `--set` assignments.
    Without files: ./params.yaml, else the package's own defaults (`default_params_file`)."""
    files = [Path(f) for f in files] if files else [default_params_file()]
    params: dict = {}
    for path in files:
        params = merge(params, _read_yaml(path), str(path))
    if config_json:
        try:
            sections = json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config-json is not valid JSON: {exc}") from None
        params = {**params, **sections}  # the JSON carries whole, already merged sections
    for text in overrides:
        params = merge(params, parse_assignment(text), "--set")
    return params
