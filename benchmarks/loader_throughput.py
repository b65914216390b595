"""Images/s of the shard loader against a plain Dataset over the same images as loose files.

Both read the same prepared (resized, re-encoded) images, decode them with the same function and
batch them the same way, so the difference is the storage layout: sequential tars through
webdataset versus one file per image through a map-style Dataset.

    python benchmarks/loader_throughput.py --size 256 --workers 2 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from latent_inpaint.config import section
from latent_inpaint.params import load_params
from latent_inpaint.data.images import IMAGE_EXTENSIONS
from latent_inpaint.data.ingest import DataError, prepare, shard_paths
from latent_inpaint.data.loader import image_loader, image_tensor

ROOT = Path(__file__).resolve().parents[1]
SPLIT = "train"


class LooseImages(Dataset):
    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        return {"image": image_tensor(path.read_bytes()), "key": path.stem}


def _source(folder: Path, limit: int | None, work: Path) -> Path:
    """`folder`, or a folder of links to its first `limit` images."""
    if limit is None:
        return folder
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit]
    linked = work / "source"
    linked.mkdir()
    for i, path in enumerate(images):
        (linked / f"{i:06d}{path.suffix.lower()}").symlink_to(path.resolve())
    return linked


def _extract(shards: Path, out: Path) -> list[Path]:
    """The split's images, byte for byte as stored in the shards, as one file each."""
    out.mkdir()
    files = []
    for tar_path in shard_paths(shards, SPLIT):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if not member.name.endswith(".json"):
                    (out / member.name).write_bytes(tar.extractfile(member).read())
                    files.append(out / member.name)
    return files


def _pass(loader) -> tuple[int, float]:
    start, images = time.perf_counter(), 0
    for batch in loader:
        images += len(batch["key"])
    return images, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=Path("/work/shared/data/places_natural/images"))
    ap.add_argument("--size", type=int, default=256, help="prepared image side (data.size)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of both loaders")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N source images")
    ap.add_argument("--passes", type=int, default=3, help="timed passes per loader, after one warm-up")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/loader_throughput.json")
    args = ap.parse_args(argv)

    if not args.source.is_dir():
        sys.exit(f"loader_throughput: source folder {args.source} does not exist; pass --source <image folder>")
    # Everything goes to one split, so that the benchmark reads every prepared image.
    overrides = [f"data.size={args.size}", "data.val_fraction=0.0", "data.test_fraction=0.0", *args.set]
    cfg = section(load_params([args.params], overrides), "data")

    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        try:
            prepare(cfg, _source(args.source, args.limit, work), work / "shards", progress=False)
        except DataError as exc:
            sys.exit(f"loader_throughput: {exc}")
        prepare_s = time.perf_counter() - start
        files = _extract(work / "shards", work / "loose")

        loaders = {
            "shards": image_loader(work / "shards", SPLIT, args.batch_size, workers=args.workers, seed=0),
            "loose": DataLoader(
                LooseImages(files),
                batch_size=args.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=args.workers,
                persistent_workers=args.workers > 0,
                generator=torch.Generator().manual_seed(0),
            ),
        }
        for loader in loaders.values():
            _pass(loader)  # warm-up: worker start-up and the page cache
        timings = {name: [] for name in loaders}
        for _ in range(args.passes):  # interleaved, so that drift in machine load hits both alike
            for name, loader in loaders.items():
                timings[name].append(_pass(loader))
        del loaders, loader  # stop the persistent workers before their files go

    results = {
        name: {
            "images_per_pass": [n for n, _ in runs],
            "seconds_per_pass": [round(s, 4) for _, s in runs],
            "images_per_s": round(statistics.median(n / s for n, s in runs), 1),
        }
        for name, runs in timings.items()
    }
    ratio = results["shards"]["images_per_s"] / results["loose"]["images_per_s"]
    report = {
        "settings": {
            "source": str(args.source),
            "images": len(files),
            "size": cfg.size,
            "image_format": cfg.image_format,
            "shard_size": cfg.shard_size,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "passes": args.passes,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "prepare_s": round(prepare_s, 2),
        "results": results,
        "ratio_shards_over_loose": round(ratio, 3),
    }

    print(f"{len(files)} {cfg.image_format} images of {cfg.size} px, batch {args.batch_size}, "
          f"{args.workers} workers, median of {args.passes} passes (prepare took {prepare_s:.1f} s)")
    print(f"{'loader':<8} {'images/pass':>11} {'s/pass':>8} {'images/s':>9}")
    for name, r in results.items():
        print(f"{name:<8} {r['images_per_pass'][0]:>11} {statistics.median(r['seconds_per_pass']):>8.3f} "
              f"{r['images_per_s']:>9.1f}")
    print(f"ratio shards / loose: {ratio:.2f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
