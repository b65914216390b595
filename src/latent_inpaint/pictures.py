"""Pictures a person looks at: grids of images, masks and samples."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from .data.images import decode


def grid(images: list[np.ndarray], cols: int, pad: int = 2, background: int = 255) -> Image.Image:
    """Tile (H, W, 3) or (H, W) uint8 arrays of one size into rows of `cols`."""
    if not images:
        raise ValueError("grid needs at least one image")
    tiles = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in images]
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), background, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = tile
    return Image.fromarray(canvas)


def shard_preview(shards_dir: Path, split: str, count: int = 16, cols: int = 8) -> Image.Image:
    """The first `count` images of a split as a grid, read straight from its shards."""
    from .data.ingest import shard_paths

    images = []
    for tar_path in shard_paths(shards_dir, split):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith((".png", ".jpg")):
                    images.append(decode(tar.extractfile(member).read()))
                    if len(images) == count:
                        return grid(images, cols)
    return grid(images, cols)
