"""The prepare stage: an image folder (or the embedded default set) -> WebDataset shards, tracked."""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image

from ..config import section, to_dict
from ..data.default import build_default_dataset
from ..data.ingest import prepare, shard_images
from ..pictures import grid
from ..tracking import stage_run, tracking_config

PREVIEW_IMAGES, PREVIEW_COLUMNS = 16, 8
LISTED_SKIPS = 10  # skipped files named in the summary; the manifest lists them all


def shard_preview(shards_dir: Path, split: str) -> Image.Image:
    """The first images of a split as a grid, read straight from its shards."""
    return grid([image for _, image in shard_images(shards_dir, split, PREVIEW_IMAGES)], PREVIEW_COLUMNS)


def run(params: dict, source: str | None, out: Path, default_dir: Path, *, progress: bool = True) -> str:
    """Shard `source` (default: data.source; "default" builds the embedded set in `default_dir`
    unless it is there) into `out`; log counts, throughput and a preview; return a summary."""
    cfg = section(params, "data")
    source = Path(source or cfg.source)
    if str(source) == "default":
        source = Path(default_dir)
        if not source.is_dir():
            build_default_dataset(source, cfg.default_count, cfg.size, cfg.default_seed)
    with stage_run("prepare", tracking_config(params), {"data": to_dict(cfg)}) as tracker:
        start = time.perf_counter()
        manifest = prepare(cfg, source, Path(out), progress=progress)
        seconds = time.perf_counter() - start
        counts = {split: s["images"] for split, s in manifest["splits"].items()}
        tracker.log_metrics({
            "images_found": manifest["found"],
            "images_written": manifest["written"],
            "images_skipped": len(manifest["skipped"]),
            "images_per_s": manifest["found"] / seconds,
            **{f"images_{split}": n for split, n in counts.items()},
        })
        tracker.log_image(shard_preview(Path(out), "train"), "train_samples.png")
    lines = [f"{manifest['written']} images sharded into {out} ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
             f"{len(manifest['skipped'])} skipped, listed in {Path(out) / 'manifest.json'}"]
    lines += [f"  skipped {skip['path']}: {skip['reason']}" for skip in manifest["skipped"][:LISTED_SKIPS]]
    return "\n".join(lines)
