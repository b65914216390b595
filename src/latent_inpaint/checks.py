"""Typed reading of parameter sections: a mapping becomes a frozen dataclass, every key checked
(unknown and missing keys are errors that name them; text from a command line becomes the declared
type), and the small value checks the sections' __post_init__ share. The sections are config.py."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A parameter file or override is malformed; the message names the file and the key."""


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_positive(key: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be positive, got {value}")


def check_range(key: str, value, lo, hi) -> None:
    """lo <= value <= hi; None: no bound on that side."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        allowed = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"{key} must be {allowed}, got {value}")


SEED_LIMIT = 2**63  # a torch generator's seed is a signed 64-bit integer


def check_seed(key: str, seed: int, samples: int) -> None:
    """Sample i is drawn with seed + i: every one of them must fit the generator."""
    if not 0 <= seed <= SEED_LIMIT - samples:
        raise ConfigError(f"{key} must lie in [0, 2**63 - samples] = [0, {SEED_LIMIT - samples}] (sample i uses "
                          f"seed + i), got {seed}")


def check_training(name: str, cfg) -> None:
    """The optimiser and length keys every trained part has."""
    for key in ("lr", "batch_size", "steps"):
        check_positive(f"{name}.{key}", getattr(cfg, key))
    if not all(0 <= b < 1 for b in cfg.betas):
        raise ConfigError(f"{name}.betas must both lie in [0, 1), got {list(cfg.betas)}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if isinstance(value, str) and hint is not str:
        # Command lines (snakemake --config, --set) hand nested values over as text.
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if hint is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "5e-5" (no dot) as text
        except ValueError:
            pass
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def build(cls: type, values: Any, where: str):
    """Build dataclass `cls` from a mapping; unknown and missing keys are errors naming them."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(names)})")
    missing = [n for n in names if n not in values]
    if missing:
        raise ConfigError(f"missing key(s) in {where}: {', '.join(missing)}")
    return cls(**{n: _coerce(values[n], hints[n], f"{where}.{n}") for n in names})


def to_dict(cfg) -> dict:
    """A dataclass config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
