"""Inpainting masks: MAT's free-form generator, the centred box, fixed evaluation sets, user files.

Convention everywhere: a uint8 array (H, W) with 1 = visible and 0 = hole. Mask PNGs written here
are mode L with 255 = visible and 0 = hole (MAT's polarity); files from users may use either
polarity and are read with `load_mask`.

Hole-ratio boundaries: like MAT, a free-form mask is kept only when lo < ratio < hi, both strict,
so a mask is never all-visible (nothing to inpaint) nor all-hole, even for the range [0, 1].
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import warnings
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .config import FreeFormConfig, MasksConfig, to_dict
from .files import atomic_write

KINDS = ("small", "large", "box")
CONVENTION = "PNG mode L: 255 = visible, 0 = hole"
MANIFEST = "manifest.json"
GRID = "masks.png"
MAX_TRIES = 10_000  # rejection-sampling budget for one free-form mask

# Brush strokes at 256 px (MAT): vertices, zig-zag turning angles, widths.
MIN_VERTICES, MAX_VERTICES = 4, 18  # upper bound exclusive: 4..17 vertices
MEAN_ANGLE, ANGLE_SPREAD = 2 * math.pi / 5, 2 * math.pi / 15
MIN_WIDTH, MAX_WIDTH = 12, 48

GRID_SEP = 2  # px of grey between the masks in masks.png
GRID_LABEL = 44  # px column on the left of masks.png holding the row names


# ---------------------------------------------------------------------------------- generators


def hole_ratio(mask: np.ndarray) -> float:
    """Fraction of hole (0) pixels."""
    return float(np.mean(mask == 0))


def _draw_count(count: int, rng: np.random.Generator) -> int:
    # MAT draws "up to count" as uniform in [0, count): count = 1 therefore means none.
    return int(rng.integers(count)) if count > 0 else 0


def _rectangles(mask: np.ndarray, count: int, max_side: int, rng: np.random.Generator) -> None:
    """Cut up to `count` rectangles of sides < max_side into `mask` (S, S), in place."""
    size = mask.shape[0]
    for _ in range(_draw_count(count, rng)):
        w, h = (int(v) for v in rng.integers(max(max_side, 1), size=2))
        # A rectangle may overhang the border by half its side, so edges get holes as often as the middle.
        x = int(rng.integers(-(w // 2), size - w + w // 2))
        y = int(rng.integers(-(h // 2), size - h + h // 2))
        mask[max(y, 0) : y + h, max(x, 0) : x + w] = 0


def _strokes(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `count` zig-zag brush strokes; (S, S) bool, True = painted (hole)."""
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    step = math.sqrt(2) * size / 8  # mean segment length: an eighth of the diagonal
    for _ in range(_draw_count(count, rng)):
        n = int(rng.integers(MIN_VERTICES, MAX_VERTICES))
        lo = MEAN_ANGLE - rng.uniform(0, ANGLE_SPREAD)
        hi = MEAN_ANGLE + rng.uniform(0, ANGLE_SPREAD)
        angles = rng.uniform(lo, hi, n)
        angles[::2] = 2 * math.pi - angles[::2]  # alternate the turning direction: a zig-zag
        lengths = np.clip(rng.normal(step, step / 2, n), 0, 2 * step)
        x, y = (int(v) for v in rng.integers(size, size=2))
        points = [(x, y)]
        for angle, length in zip(angles, lengths):
            x = int(np.clip(x + length * math.cos(angle), 0, size))
            y = int(np.clip(y + length * math.sin(angle), 0, size))
            points.append((x, y))
        width = max(1, int(rng.uniform(MIN_WIDTH, MAX_WIDTH) * size / 256))
        draw.line(points, fill=1, width=width)
        r = width // 2  # round caps and joints, which a thick PIL line lacks
        for px, py in points:
            draw.ellipse((px - r, py - r, px + r, py + r), fill=1)
    painted = np.asarray(layer, dtype=bool)
    if rng.random() < 0.5:
        painted = painted[::-1]
    if rng.random() < 0.5:
        painted = painted[:, ::-1]
    return painted


def free_form_mask(size: int, cfg: FreeFormConfig, rng: np.random.Generator) -> np.ndarray:
    """MAT's free-form mask (S, S): rectangles at two scales plus brush strokes, rejection-sampled
    until lo < hole ratio < hi. Deterministic given `rng`."""
    lo, hi = cfg.hole_range
    for _ in range(MAX_TRIES):
        mask = np.ones((size, size), np.uint8)
        _rectangles(mask, cfg.rects_half, size // 2, rng)
        _rectangles(mask, cfg.rects_full, size, rng)
        mask[_strokes(size, cfg.strokes, rng)] = 0
        if lo < hole_ratio(mask) < hi:
            return mask
    raise ValueError(
        f"no free-form mask with hole ratio in ({lo}, {hi}) at size {size} after {MAX_TRIES} tries "
        f"(rects_half={cfg.rects_half}, rects_full={cfg.rects_full}, strokes={cfg.strokes}): "
        "widen hole_range or change the counts"
    )


def box_mask(size: int | tuple[int, int], fraction: float) -> np.ndarray:
    """Centred box hole: `fraction` of the height by `fraction` of the width, each side floored
    (204x204 at 256 px with 0.8, as in the paper; 3200x4800 on a 4000x6000 landscape photo).
    `size`: S for an S x S mask, or (H, W). When a margin is odd its extra pixel goes to the
    bottom or right."""
    h, w = (size, size) if isinstance(size, int) else size
    mask = np.ones((h, w), np.uint8)
    hole_h, hole_w = (math.floor(round(fraction * side, 6)) for side in (h, w))  # 0.29 * 100 gives 29, not 28
    top, left = (h - hole_h) // 2, (w - hole_w) // 2
    mask[top : top + hole_h, left : left + hole_w] = 0
    return mask


def _stable_int(text: str) -> int:
    # Python's hash() of a str changes from process to process; crc32 does not.
    return zlib.crc32(text.encode())


def eval_mask(kind: str, size: int, cfg: MasksConfig, split: str, index: int) -> np.ndarray:
    """The fixed evaluation mask (S, S) of image `index` of `split`. Each mask has its own seed,
    so it does not depend on which other masks were drawn before it."""
    if kind not in KINDS:
        raise ValueError(f"mask kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind == "box":
        return box_mask(size, cfg.box_fraction)
    seed = np.random.SeedSequence([cfg.seed, _stable_int(split), _stable_int(kind), index])
    return free_form_mask(size, getattr(cfg, kind), np.random.default_rng(seed))


# ---------------------------------------------------------------------------------- files


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask * 255).save(buf, format="PNG")
    return buf.getvalue()


def _grid(rows: dict[str, list[np.ndarray]], size: int) -> Image.Image:
    """One labelled row of masks per kind, separated by thin grey lines."""
    cols = max(len(masks) for masks in rows.values())
    step = size + GRID_SEP
    grid = Image.new("L", (GRID_LABEL + GRID_SEP + cols * step, GRID_SEP + len(rows) * step), 128)
    draw = ImageDraw.Draw(grid)
    draw.rectangle((0, 0, GRID_LABEL - 1, grid.height - 1), fill=255)
    for r, (name, masks) in enumerate(rows.items()):
        top = GRID_SEP + r * step
        draw.text((4, top + size // 2 - 6), name, fill=0)
        for c, mask in enumerate(masks):
            grid.paste(Image.fromarray(mask * 255), (GRID_LABEL + GRID_SEP + c * step, top))
    return grid


def write_eval_masks(cfg: MasksConfig, size: int, keys: Mapping[str, Sequence[str]], out_dir: Path) -> dict:
    """Write `<split>/<kind>/<key>.png` for every image key of each split in `cfg.splits` (`keys`:
    the split's image keys in shard order), the preview grid `masks.png` and `manifest.json` (last,
    so it exists only for a complete set)."""
    if not cfg.splits:
        raise ValueError("masks.splits is empty: there are no evaluation masks to write")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    splits: dict = {}
    for split in cfg.splits:
        splits[split] = {}
        for kind in KINDS:
            folder = out_dir / split / kind
            shutil.rmtree(folder, ignore_errors=True)  # no stale masks of keys from an earlier run
            folder.mkdir(parents=True)
            digest, ratios = hashlib.sha256(), []
            for index, key in enumerate(keys[split]):
                mask = eval_mask(kind, size, cfg, split, index)
                data = _png(mask)
                (folder / f"{key}.png").write_bytes(data)
                digest.update(data)
                ratios.append(hole_ratio(mask))
            splits[split][kind] = {
                "count": len(keys[split]),
                "hole_ratio": {"mean": float(np.mean(ratios)), "min": min(ratios), "max": max(ratios)}
                if ratios
                else None,
                "sha256": digest.hexdigest(),
            }
    # The preview shows the masks that the first images of the first split get.
    first = cfg.splits[0]
    rows = {kind: [eval_mask(kind, size, cfg, first, i) for i in range(cfg.grid_count)] for kind in KINDS}
    buf = io.BytesIO()
    _grid(rows, size).save(buf, format="PNG")
    atomic_write(out_dir / GRID, buf.getvalue())
    manifest = {
        "convention": CONVENTION,
        "size": size,
        "params": to_dict(cfg),
        "grid": {"file": GRID, "split": first, "rows": list(KINDS), "columns": cfg.grid_count},
        "splits": splits,
    }
    atomic_write(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def read_eval_mask(masks_dir: Path, split: str, kind: str, key: str) -> np.ndarray:
    """The fixed evaluation mask of one image, as `write_eval_masks` wrote it."""
    return load_mask(Path(masks_dir) / split / kind / f"{key}.png", hole_is_white=False)


def user_mask(spec: str, image_path: Path, shape: tuple[int, int], cfg: MasksConfig, *, seed: int, index: int,
              hole_is_white: bool = True) -> np.ndarray:
    """The mask (H, W), 1 = visible, of the `index`-th image a user inpaints. `spec`: a kind
    (box: the centred box_fraction of the height by box_fraction of the width, see `box_mask`;
    small|large: generated at the image's longer side, drawn from (seed, index), centre-cropped
    to `shape`), a mask file, or a folder holding the file named like the image."""
    if spec == "box":
        return box_mask(tuple(shape), cfg.box_fraction)
    if spec in KINDS:
        side = max(shape)
        square = free_form_mask(side, getattr(cfg, spec), np.random.default_rng([seed, index]))
        top, left = (side - shape[0]) // 2, (side - shape[1]) // 2
        return square[top : top + shape[0], left : left + shape[1]]
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.stem == Path(image_path).stem)
        if not found:
            raise ValueError(f"no mask named {Path(image_path).stem}.* in {path} for {image_path}")
        path = found[0]
    return load_mask(path, hole_is_white=hole_is_white, size=shape)


def load_mask(path, hole_is_white: bool = True, size: tuple[int, int] | None = None) -> np.ndarray:
    """A user's mask file as (H, W) uint8, 1 = visible. Any PIL mode; the luminance is thresholded
    at 128 (alpha is ignored). `hole_is_white`: white = hole (LaMa, NVIDIA irregular masks);
    False: white = visible (MAT, RePaint). `size`: the expected (H, W)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            lum = np.asarray(im.convert("L"))  # (H, W)
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read mask file {path}: {exc}") from None
    if size is not None and lum.shape != tuple(size):
        h, w = lum.shape
        raise ValueError(f"mask file {path} is {h}x{w} (HxW), expected {size[0]}x{size[1]}")
    if np.any((lum != 0) & (lum != 255)):
        warnings.warn(f"mask file {path} has grey values: thresholded at 128", stacklevel=2)
    white = lum >= 128
    return (~white if hole_is_white else white).astype(np.uint8)
