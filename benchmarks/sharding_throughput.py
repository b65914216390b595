"""Sharding throughput: `prepare` with N worker processes vs a plain one-process loop.

The baseline decodes, resizes and encodes the same images in one process with the same library
calls and writes nothing, so the ratio shows what the parallel sharder gains (and what its tar
writing, hashing and bookkeeping cost). Both run in the same invocation, on the same files.

    python benchmarks/sharding_throughput.py --source ../shared/data/places_natural/images --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from latent_inpaint.config import section
from latent_inpaint.params import load_params
from latent_inpaint.data.images import IMAGE_EXTENSIONS, SkipImage, encode, prepare_image
from latent_inpaint.data.ingest import prepare

REPO = Path(__file__).resolve().parents[1]


def baseline(files: list[Path], cfg) -> float:
    start = time.perf_counter()
    for path in files:
        try:
            im, _ = prepare_image(path, cfg.size, cfg.min_side)
        except SkipImage:
            continue
        encode(im, cfg.image_format, cfg.jpeg_quality)
    return len(files) / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=REPO.parent / "shared/data/places_natural/images")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=50)
    ap.add_argument("--format", choices=["png", "jpg"], default="jpg")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/sharding_throughput.json")
    args = ap.parse_args()
    if not args.source.is_dir():
        sys.exit(f"sharding_throughput: source folder {args.source} does not exist (pass --source DIR)")

    files = sorted(p for p in args.source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    files = files[: args.limit] if args.limit else files
    cfg = section(load_params([REPO / "params.yaml"], [
        f"data.size={args.size}", f"data.min_side={min(args.size, 32)}", f"data.workers={args.workers}",
        f"data.shard_size={args.shard_size}", f"data.image_format={args.format}",
        "data.val_fraction=0.0", "data.test_fraction=0.0",
    ]), "data")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for i, f in enumerate(files):  # a flat folder of exactly these files
            os.symlink(f.resolve(), src / f"{i:06d}{f.suffix.lower()}")
        for f in files:  # both runs read from the page cache, neither pays for the first disk read
            f.read_bytes()
        one = baseline(files, cfg)
        start = time.perf_counter()
        manifest = prepare(cfg, src, Path(tmp) / "shards", progress=False)
        sharded = len(files) / (time.perf_counter() - start)

    result = {
        "images": len(files),
        "written": manifest["written"],
        "size": args.size,
        "format": args.format,
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "one_process_images_per_s": round(one, 1),
        "sharded_images_per_s": round(sharded, 1),
        "ratio": round(sharded / one, 2),
    }
    print(f"{len(files)} images from {args.source} at {args.size} px, {args.format}")
    print(f"  one process, decode+resize+encode : {one:8.1f} img/s")
    print(f"  prepare, {args.workers} worker processes    : {sharded:8.1f} img/s")
    print(f"  ratio                             : {sharded / one:8.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
