"""The results table (shaped like the paper's Table 1) and the metrics JSON that DVC reads."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..files import atomic_write

MISSING = "–"


def format_value(value, digits: int = 2) -> str:
    """A float with `digits` decimals; a (mean, std) pair as "0.29±0.06"; None or NaN as "–"."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return MISSING
    if isinstance(value, (tuple, list)):
        mean, std = value
        return f"{mean:.{digits}f}±{std:.{digits}f}"
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def table_markdown(rows: Mapping[str, Mapping[str, object]], columns: Sequence[str], title: str,
                   stand_in: Sequence[str] = (), digits: int = 2) -> str:
    """A Markdown table, one row per method and one column per metric, e.g. columns
    ["FID small", "FID large", "FID box", "diversity box", "hole PSNR box"]; a cell missing from a
    row shows "–". `stand_in`: names of the weights that were random stand-ins (e.g.
    ["inception", "vgg16"]); the table then ends with a footnote saying so."""
    lines = [f"### {title}", "", "| method | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for method, values in rows.items():
        lines.append(f"| {method} | " + " | ".join(format_value(values.get(c), digits) for c in columns) + " |")
    if stand_in:
        lines += ["", f"Stand-in (random) weights for {', '.join(stand_in)}: the FID / LPIPS numbers are "
                  "smoke-run values, not comparable with published results."]
    return "\n".join(lines) + "\n"


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_metrics_json(path: str | Path, metrics: Mapping) -> None:
    """Write metrics atomically as sorted, indented JSON (NumPy scalars become plain numbers;
    NaN or infinity is an error, as JSON has no such values)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metrics, indent=2, sort_keys=True, default=_plain, allow_nan=False)
    atomic_write(path, (text + "\n").encode())
