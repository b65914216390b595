"""Batches of images streamed from the WebDataset shards that `ingest` writes.

Reading whole tars in sequence keeps the file system out of the way on a large split. Ranks and
loader workers each take a fixed slice of the shard list (webdataset splits before it shuffles),
so a rank reads the same shards every epoch, in an order reshuffled each epoch from `seed`.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from .images import decode
from .ingest import DataError, read_manifest, shard_paths

IMAGE_FIELDS = ("png", "jpg", "jpeg")
# Held per worker as encoded bytes (~100 kB at 256 px): a few shards deep, a few tens of MB.
SHUFFLE_BUFFER = 512


def image_tensor(data: bytes) -> torch.Tensor:
    """An encoded png/jpg image -> (3, H, W) float32 in [-1, 1]."""
    pixels = decode(data).astype(np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _decode_sample(sample: dict) -> dict:
    # The extension only says which field holds the bytes; webdataset's autodecode would also
    # choose the decoder and the value range from it.
    for field in IMAGE_FIELDS:
        if field in sample:
            return {"image": image_tensor(sample[field]), "key": sample["__key__"]}
    raise DataError(f"{sample['__url__']}: sample {sample['__key__']} has no {'/'.join(IMAGE_FIELDS)} image")


def _collate(samples: list[dict]) -> dict:
    return {"image": torch.stack([s["image"] for s in samples]), "key": [s["key"] for s in samples]}


def _rank_share(urls, rank: int, world_size: int):
    """The shards of one rank: every world_size-th, from its own."""
    return itertools.islice(urls, rank, None, world_size)


def image_loader(
    shards_dir: str | Path,
    split: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
    shuffle: bool = True,
    seed: int = 0,
    epoch_images: int | None = None,
    drop_last: bool = True,
) -> wds.WebLoader:
    """Batches {"image": (B, 3, H, W) float32 in [-1, 1], "key": [str] * B} of one split.

    `rank` of `world_size` ranks reads its own share of the shards. shuffle=False reads the split
    in `split_keys` order when workers <= 1 (and one rank); more workers return their batches in
    turn, a fixed interleaving of that order. `epoch_images` (all ranks together)
    makes an epoch a fixed number of batches, repeating shards where a rank runs short; under
    DDP it defaults to the split's size, so that every rank takes the same number of steps.
    """
    shards_dir = Path(shards_dir)
    urls = [str(p) for p in shard_paths(shards_dir, split)]
    counts = [s["images"] for s in read_manifest(shards_dir)["splits"][split]["shards"]]
    if sum(counts) == 0:
        raise DataError(f"{shards_dir}: split {split!r} has no images (no shard with images in its manifest)")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise DataError(f"{shards_dir}: {len(missing)} shard(s) of split {split!r} missing, e.g. {missing[0]}")

    mine = counts[rank::world_size]  # the shards _rank_share leaves to this rank
    if sum(mine) == 0:
        raise DataError(
            f"{shards_dir}: split {split!r} has {len(urls)} shard(s), too few for {world_size} ranks: "
            "prepare it with a smaller data.shard_size"
        )
    workers = min(workers, len(mine))  # a worker without a shard would only idle
    per_worker = [sum(mine[w :: max(workers, 1)]) for w in range(max(workers, 1))]
    if drop_last and max(per_worker) < batch_size:
        # Each worker batches its own shards; none could fill a batch, so an epoch would be empty.
        raise DataError(
            f"{shards_dir}: split {split!r} gives each loader worker at most {max(per_worker)} images, "
            f"fewer than batch_size={batch_size}: lower batch_size or workers, or set drop_last=False"
        )

    dataset = wds.WebDataset(
        urls,
        shardshuffle=len(urls) if shuffle else False,
        detshuffle=True,  # seeded with seed + epoch: reproducible, yet a new order every epoch
        nodesplitter=functools.partial(_rank_share, rank=rank, world_size=world_size),
        workersplitter=wds.split_by_worker,
        empty_check=False,  # a rank or worker may hold no shard of a small split
        seed=seed,
    )
    if shuffle:
        # Before decoding, so that the buffer holds compressed bytes rather than float pixels.
        dataset = dataset.compose(wds.detshuffle(SHUFFLE_BUFFER, seed=seed))
    dataset = dataset.map(_decode_sample).batched(batch_size, collation_fn=_collate, partial=not drop_last)

    loader = wds.WebLoader(
        dataset,
        batch_size=None,  # batched in the workers above
        num_workers=workers,
        # Workers keep their shuffle epoch counters, and their start-up cost, across epochs.
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    if epoch_images is None and world_size > 1:
        epoch_images = sum(counts)
    if epoch_images is not None:
        per_rank = epoch_images // world_size
        batches = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
        if batches == 0:
            raise DataError(
                f"an epoch of {epoch_images} images over {world_size} rank(s) is less than one batch of {batch_size}"
            )
        loader = loader.with_epoch(batches)
    return loader
