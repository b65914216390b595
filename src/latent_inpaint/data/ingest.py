"""Ingest: image folders, Places365-Standard or CelebA-HQ -> train/val/test WebDataset shards.

Each shard is written by one worker process from a fixed list of input files, atomically, with a
sidecar JSON that records a fingerprint of its inputs and settings: an interrupted run resumes by
keeping every shard whose sidecar still matches. The workers end with their parent, whatever
ended it (SIGKILL included); SIGTERM and Ctrl-C stop them and say which shards are kept. Tars are byte-reproducible (fixed metadata), so
DVC sees no change when nothing changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import signal
import tarfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import DataConfig, to_dict
from ..files import atomic_write, sha256_file
from ..stopping import Stopped, sigterm_stops
from .images import IMAGE_EXTENSIONS, SkipImage, decode, encode, prepare_image

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PARENT_CHECK_S = 0.5  # how often a worker looks whether its parent is still alive


class DataError(RuntimeError):
    """The input dataset cannot be used at all; the message says which file or folder and why."""


@dataclasses.dataclass(frozen=True)
class Record:
    path: Path  # absolute file path
    name: str  # path relative to the dataset root, as listed in the manifest


@dataclasses.dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    records: tuple[Record, ...]

    @property
    def stem(self) -> str:
        return f"{self.split}-{self.index:06d}"


# ---------------------------------------------------------------------------------- discovery


def _scan(root: Path) -> list[Record]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.lower().endswith(IMAGE_EXTENSIONS) and not fn.startswith("."):
                path = Path(dirpath) / fn
                found.append(Record(path, path.relative_to(root).as_posix()))
    return found


def _hash_order(records: list[Record], seed: int) -> list[Record]:
    # Ordering by a hash of the name, not the listing, keeps a split independent of file system order.
    return sorted(records, key=lambda r: hashlib.sha1(f"{seed}:{r.name}".encode()).hexdigest())


def _cut(records: list[Record], fractions: dict[str, float], seed: int) -> dict[str, list[Record]]:
    """Deterministic split of `records` into the splits named in `fractions` (plus train)."""
    ordered = _hash_order(records, seed)
    out, start = {}, 0
    for split, frac in fractions.items():
        n = round(len(ordered) * frac)
        if frac > 0 and n == 0 and len(ordered) - start > 1:
            n = 1  # a tiny dataset still gets an image in every requested split
        out[split] = sorted(ordered[start : start + n], key=lambda r: r.name)
        start += n
    out["train"] = sorted(ordered[start:], key=lambda r: r.name)
    return out


def _read_list(path: Path) -> list[list[str]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"cannot read file list {path}: {exc.strerror}") from None
    return [line.split() for line in lines if line.strip() and not line.startswith("#")]


def _listed(root: Path, names: list[str], missing: list[dict], listfile: Path) -> list[Record]:
    out = []
    for name in names:
        path = root / name.lstrip("/")
        if path.is_file():
            out.append(Record(path, path.relative_to(root).as_posix()))
        else:
            missing.append({"path": str(path), "reason": f"listed in {listfile.name} but missing"})
    return out


def _first_dir(root: Path, *names: str) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root} has none of the folders {', '.join(names)} (Places365-Standard layout)")


def discover(cfg: DataConfig, root: Path) -> tuple[dict[str, list[Record]], list[dict]]:
    """Images of each split and the files already known to be unusable (missing from a list)."""
    if not root.is_dir():
        raise DataError(f"data source {root} is not a folder")
    missing: list[dict] = []
    holdout = {"val": cfg.val_fraction, "test": cfg.test_fraction}

    if cfg.layout == "folder":
        given = [s for s in SPLITS if (root / s).is_dir()]
        if given:  # the user's own train/ val/ test/ folders are the split
            return {s: _scan(root / s) if s in given else [] for s in SPLITS}, missing
        return _cut(_scan(root), holdout, cfg.split_seed), missing

    if cfg.layout == "places365":
        # Official lists: train_standard for training; the 36,500-image val list is the test set
        # used by the paper (and MAT, LaMa); our val split is a hold-out of data.val_images images
        # of the training list, as many as the stages score, not a fraction of 1.8 M.
        lists = Path(cfg.lists) if cfg.lists else root / "filelist_places365-standard"
        if not lists.is_dir():
            lists = root
        train_list, val_list = lists / "places365_train_standard.txt", lists / "places365_val.txt"
        train_dir = _first_dir(root, "data_256", "data_large_standard", "data_large")
        val_dir = _first_dir(root, "val_256", "val_large")
        train = _listed(train_dir, [r[0] for r in _read_list(train_list)], missing, train_list)
        test = _listed(val_dir, [r[0] for r in _read_list(val_list)], missing, val_list)
        ordered = _hash_order(train, cfg.split_seed)
        val = sorted(ordered[: cfg.val_images], key=lambda r: r.name)
        return {"train": sorted(ordered[cfg.val_images :], key=lambda r: r.name), "val": val, "test": test}, missing

    # celebahq: a split file "<image> <split>"; with the CelebAMask-HQ mapping, the split file is
    # CelebA's list_eval_partition.txt and names are translated to CelebA-HQ indices. Its codes
    # are CelebA's partitions: the paper's 2,993 CelebA-HQ test images are CelebA's validation
    # partition (1), so 1 is our test split (the evaluation set) and CelebA's test partition (2)
    # our val split. Words (train, val, test) name our splits as they are.
    if not cfg.lists:
        raise DataError("data.layout celebahq needs data.lists: the split file")
    split_file = Path(cfg.lists)
    rows = _read_list(split_file)
    codes = {"0": "train", "1": "test", "2": "val", "train": "train", "val": "val",
             "valid": "val", "validation": "val", "test": "test"}
    bad = [r for r in rows if len(r) < 2 or r[1].lower() not in codes]
    if bad:
        raise DataError(f"{split_file}: line {' '.join(bad[0])!r} is not '<image> <0|1|2|train|val|test>'")
    split_of = {r[0]: codes[r[1].lower()] for r in rows}
    if cfg.celebahq_mapping:
        mapping = _read_list(Path(cfg.celebahq_mapping))
        # CelebA-HQ-to-CelebA-mapping.txt: "idx orig_idx orig_file" with a header line.
        split_of = {f"{m[0]}.jpg": split_of[m[2]] for m in mapping if m[0].isdigit() and m[2] in split_of}
    image_dir = root / "CelebA-HQ-img" if (root / "CelebA-HQ-img").is_dir() else root
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for name, split in sorted(split_of.items()):
        out[split] += _listed(image_dir, [name], missing, split_file)
    return out, missing


# ---------------------------------------------------------------------------------- sharding


def _fingerprint(cfg: DataConfig, records: tuple[Record, ...]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([cfg.size, cfg.min_side, cfg.image_format, cfg.jpeg_quality]).encode())
    for r in records:
        st = r.path.stat()
        h.update(f"{r.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(task: ShardTask, out_dir: Path, cfg: DataConfig) -> dict:
    """Decode, resize and encode one shard's images into `<split>/<stem>.tar` (+ `.json`)."""
    split_dir = out_dir / task.split
    tar_path, side_path = split_dir / f"{task.stem}.tar", split_dir / f"{task.stem}.json"
    fingerprint = _fingerprint(cfg, task.records)
    if tar_path.exists() and side_path.exists():
        done = json.loads(side_path.read_text())
        if done.get("fingerprint") == fingerprint and done.get("sha256") == sha256_file(tar_path):
            return {**done, "resumed": True}

    keys, sources, skipped = [], [], []
    buf = io.BytesIO()
    ext = "png" if cfg.image_format == "png" else "jpg"
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for pos, rec in enumerate(task.records):
            try:
                im, orig = prepare_image(rec.path, cfg.size, cfg.min_side)
            except SkipImage as exc:
                skipped.append({"path": str(rec.path), "reason": str(exc)})
                continue
            # WebDataset splits keys at the first dot: the key is positional, the name goes in json.
            key = f"{task.stem}-{pos:05d}"
            meta = {"source": rec.name, "width": orig[0], "height": orig[1]}
            _tar_add(tar, f"{key}.{ext}", encode(im, cfg.image_format, cfg.jpeg_quality))
            _tar_add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            keys.append(key)
            sources.append(rec.name)
    split_dir.mkdir(parents=True, exist_ok=True)
    data = buf.getvalue()
    atomic_write(tar_path, data)
    result = {
        "split": task.split,
        "shard": f"{task.split}/{task.stem}.tar",
        "images": len(keys),
        "sha256": hashlib.sha256(data).hexdigest(),
        "fingerprint": fingerprint,
        "keys": keys,
        "sources": sources,
        "skipped": skipped,
    }
    atomic_write(side_path, json.dumps(result, indent=1).encode())
    return {**result, "resumed": False}


def plan(splits: dict[str, list[Record]], shard_size: int) -> list[ShardTask]:
    return [
        ShardTask(split, i // shard_size, tuple(splits[split][i : i + shard_size]))
        for split in SPLITS
        for i in range(0, len(splits.get(split, [])), shard_size)
    ]


def _remove_stale(out_dir: Path, tasks: list[ShardTask]) -> None:
    keep = {f"{t.stem}{ext}" for t in tasks for ext in (".tar", ".json")}
    for split in SPLITS:
        for path in [*(out_dir / split).glob(f"{split}-*"), *(out_dir / split).glob(".*.tmp*")]:
            if path.name not in keep:
                path.unlink()


def _worker_start(parent: int) -> None:
    """Pool initializer. Ctrl-C reaches the whole process group: the parent alone handles it.
    A parent killed by SIGKILL tells no one, so each worker watches for it and exits, instead
    of writing on and then waiting forever for work that never comes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def prepare(cfg: DataConfig, source: Path, out_dir: Path, progress: bool = True) -> dict:
    """Shard every usable image of `source` into `out_dir`; return (and write) the manifest."""
    source, out_dir = Path(source), Path(out_dir)
    splits, skipped = discover(cfg, source)
    tasks = plan(splits, cfg.shard_size)
    total = sum(len(t.records) for t in tasks)
    if total == 0:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {source}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # no manifest until every shard is complete
    _remove_stale(out_dir, tasks)

    results = []
    bar = tqdm(total=total, unit="img", desc="prepare", disable=not progress, mininterval=1.0)
    with sigterm_stops(), ProcessPoolExecutor(max_workers=min(cfg.workers, len(tasks)), initializer=_worker_start,
                                              initargs=(os.getpid(),)) as pool:
        futures = {}
        try:
            futures.update({pool.submit(write_shard, t, out_dir, cfg): t for t in tasks})
            for fut in as_completed(futures):
                results.append(fut.result())
                bar.update(len(futures[fut].records))
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (see sigterm_stops)
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in multiprocessing.active_children():
                worker.terminate()
            bar.close()
            raise Stopped(f"{len(results)} of {len(tasks)} shards are complete and kept in {out_dir} (a shard is "
                          "written whole or not at all); rerun to resume", getattr(exc, "signum", signal.SIGINT)) from None
    bar.close()
    results.sort(key=lambda r: r["shard"])

    written = sum(r["images"] for r in results)
    skipped += [s for r in results for s in r["skipped"]]
    if written == 0:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])
        raise DataError(f"no usable image under {source}: all {len(skipped)} files skipped ({reasons} ...)")
    manifest = {
        "version": MANIFEST_VERSION,
        "source": str(source),
        "params": to_dict(cfg),
        "found": total + sum(1 for s in skipped if "listed in" in s["reason"]),
        "written": written,
        "resumed_shards": sum(r["resumed"] for r in results),
        "splits": {
            split: {
                "images": sum(r["images"] for r in results if r["split"] == split),
                "shards": [
                    {"path": r["shard"], "images": r["images"], "sha256": r["sha256"]}
                    for r in results
                    if r["split"] == split
                ],
            }
            for split in SPLITS
        },
        "skipped": sorted(skipped, key=lambda s: s["path"]),
    }
    atomic_write(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


# ---------------------------------------------------------------------------------- reading back


def read_manifest(shards_dir: Path) -> dict:
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} is missing: run `latent-inpaint prepare` (or the prepare rule) first")
    return json.loads(path.read_text())


def shards_fingerprint(shards_dir: Path) -> str:
    """A digest of the shards' contents (their checksums), which changes exactly when the data does."""
    splits = read_manifest(shards_dir)["splits"]
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()


def shard_paths(shards_dir: Path, split: str) -> list[Path]:
    manifest = read_manifest(shards_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{shards_dir}: unknown split {split!r}")
    return [Path(shards_dir) / s["path"] for s in manifest["splits"][split]["shards"]]


def split_keys(shards_dir: Path, split: str) -> list[str]:
    """Sample keys of a split in shard order: the row order of everything computed per image."""
    keys = []
    for tar in shard_paths(shards_dir, split):
        keys += json.loads(tar.with_suffix(".json").read_text())["keys"]
    return keys


def shard_images(shards_dir: Path, split: str, limit: int) -> list[tuple[str, np.ndarray]]:
    """The first `limit` (key, (H, W, 3) uint8 image) pairs of a split, in `split_keys` order."""
    return list(iter_shard_images(shards_dir, split, limit))


def iter_shard_images(shards_dir: Path, split: str, limit: int) -> Iterator[tuple[str, np.ndarray]]:
    """`shard_images` one image at a time, decoded as it is read: memory flat in `limit`."""
    count = 0
    for tar_path in shard_paths(shards_dir, split):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if count == limit:
                    return
                key, _, ext = member.name.rpartition(".")
                if ext in ("png", "jpg"):
                    count += 1
                    yield key, decode(tar.extractfile(member).read())
