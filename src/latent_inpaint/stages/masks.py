"""The masks stage: the fixed evaluation masks of every image key of the shards, tracked."""

from __future__ import annotations

from pathlib import Path

from ..config import section, to_dict
from ..data.ingest import read_manifest, split_keys
from ..masks import GRID, write_eval_masks
from ..tracking import stage_run, tracking_config


def run(params: dict, shards: Path, out: Path) -> str:
    """Write the mask sets of `masks.splits` for the images of `shards` into `out`; log the
    hole ratios and the preview grid; return a summary."""
    cfg = section(params, "masks")
    size = read_manifest(Path(shards))["params"]["size"]
    keys = {split: split_keys(Path(shards), split) for split in cfg.splits}
    with stage_run("masks", tracking_config(params), {"masks": to_dict(cfg)}) as tracker:
        manifest = write_eval_masks(cfg, size, keys, Path(out))
        for split, kinds in manifest["splits"].items():
            tracker.log_metrics({f"{split}_{kind}_hole_ratio": s["hole_ratio"]["mean"]
                                 for kind, s in kinds.items() if s["count"]})
        tracker.log_image(Path(out) / GRID, GRID)
    return f"evaluation masks written to {out} (grid: {Path(out) / GRID})"
