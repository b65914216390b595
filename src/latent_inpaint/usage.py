"""Command-line options, checked before any model loads or any file is written.

Every error names the option, the value given and what is allowed; the CLI exits 2 on them, as
on parameter errors (argparse's own usage errors exit 2 too).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from . import layout
from .config import SEED_LIMIT, ConfigError, SampleConfig


class UsageError(ValueError):
    """A command-line option or argument cannot be used; the message names it."""


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if action.required:
            return f"{text} (required)"
        if action.const is True and action.default is False:  # a switch
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


FOLDERS = {"runs": layout.RUNS, "vqgan": layout.run_dir("vqgan"), "shards": layout.SHARDS, "tokens": layout.TOKENS,
           "masks": layout.MASKS}  # the CLI's usual folder options and their defaults
FOLDER_HELP = {  # every folder option's help
    "runs": "folder holding vqgan/ encoder/ transformer/ decoder/",
    "vqgan": "the VQGAN's run folder (its final/ is loaded)",
    "shards": "the WebDataset shards (`prepare` writes them)",
    "tokens": "the VQGAN tokens of every split (`tokenize` writes them)",
    "masks": "the fixed evaluation masks (`masks` writes them)",
    "run_dir": "the run folder: checkpoint/, final/, metrics.json, curves",
    "default_dir": "where the embedded default dataset is built when data.source is default",
    "results": "the results folder: metrics.json, ablations/, report.md is written here",
    "out": "where this command writes",
}


def at_least(lo: int) -> Callable[[str], int]:
    """argparse type: an integer >= lo."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def seed(text: str) -> int:
    """argparse type: a seed a torch generator takes, 0 <= seed < 2**63."""
    value = at_least(0)(text)
    if value >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be below 2**63 = {SEED_LIMIT} (a 64-bit generator seed), got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def port(text: str) -> int:
    value = at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1 to 65535, got {value}")
    return value


def sample_config(base: SampleConfig, **given) -> SampleConfig:
    """`base` with the options given (None: not given); a value the section refuses is named as
    its option (--seed, --samples, ...)."""
    for key, value in given.items():
        if value is not None:
            try:
                base = dataclasses.replace(base, **{key: value})
            except ConfigError as exc:
                raise UsageError(str(exc).replace(f"sample.{key}", f"--{key}")) from None
    return base


def device(name: str | None):
    """The torch device `--device` names (None: the local GPU if any, else the CPU), checked to
    exist here, so that a missing GPU is not reported later as unloadable weights."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allowed = "cpu, cuda, cuda:N (N a visible GPU) or mps"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device: use {allowed}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name}: no CUDA GPU is visible on this machine (torch.cuda.is_available() "
                             "is False); use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"--device {name}: only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise UsageError(f"--device {name}: unsupported device type {dev.type!r}; use {allowed}")
    return dev
