"""The inpaint command: inpaint an image file or a folder of them with the trained (or imported)
model, each file's results in a folder of its own, written beside the others atomically; the
model itself is `latent_inpaint.inpaint.Inpainter`."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..config import MasksConfig, SampleConfig, section, to_dict
from ..data.images import IMAGE_EXTENSIONS, SkipImage, load_rgb
from ..files import atomic_write
from ..inpaint import Inpainter
from ..masks import KINDS, load_mask, user_mask
from ..pictures import grid, inpainting_row
from ..stopping import sigterm_stops
from ..usage import UsageError

FAILED = "failed"  # the status of a file that could not be inpainted

GRID_TILE = 512  # px: each picture of grid.png (input | masked | samples) fits in GRID_TILE x GRID_TILE
STAGING = ".partial"  # suffix of the hidden folder an image's results are written into before the swap
ALPHA_POLICY = ("an alpha channel is composited on white for the model; each sample keeps the input's alpha "
                "channel unchanged (RGBA PNG); grid.png shows the composite")
FOLDERS = ("<out>/<input file name>/ (photo.jpg -> photo.jpg/, photo.png -> photo.png/): distinct files never "
           "share a folder; a rerun replaces an image's folder whole; a failed image has none")


def load_image(path: Path) -> np.ndarray:
    """Any image file as (H, W, 3) uint8 (EXIF orientation applied, alpha on white)."""
    try:
        return np.asarray(load_rgb(Path(path)))
    except SkipImage as exc:
        raise ValueError(f"cannot use image {path}: {exc}") from None


def load_alpha(path: Path) -> np.ndarray | None:
    """The (H, W) uint8 alpha channel of an image file that has one (EXIF orientation applied)."""
    with Image.open(path) as im:
        if not im.has_transparency_data:
            return None
        return np.asarray(ImageOps.exif_transpose(im).convert("RGBA").getchannel("A"))


def image_files(path: Path) -> list[Path]:
    """The image itself, or the images of a folder in name order (hidden files left out)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not found:
            raise UsageError(f"input folder {path} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
        return found
    if path.is_file():
        return [path]
    raise UsageError(f"input {path}: no such file or folder")


def check_mask_option(mask: str, images: list[Path]) -> None:
    """`--mask` is a kind, an existing folder, or a readable mask file (of the images' size is
    checked per image): anything else fails before a model loads."""
    if mask in KINDS:
        return
    path = Path(mask)
    if not path.exists():
        raise UsageError(f"--mask {mask}: no such file or folder; use a mask file, a folder of masks named like the "
                         f"images, or one of {', '.join(KINDS)}")
    if path.is_file():
        try:
            load_mask(path)
        except ValueError as exc:
            raise UsageError(f"--mask {mask}: {exc}") from None


def _thumb(picture: np.ndarray, resample=Image.Resampling.BICUBIC) -> np.ndarray:
    im = Image.fromarray(picture)
    im.thumbnail((GRID_TILE, GRID_TILE), resample)
    return np.asarray(im)


def _remove(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)


def _remove_staging(out: Path) -> None:
    for folder in out.glob(f".*{STAGING}"):
        _remove(folder)


@contextlib.contextmanager
def _staging_removed_on_stop(out: Path) -> Iterator[None]:
    """A stop can land between a hidden folder's creation and the code that owns it."""
    try:
        yield
    except KeyboardInterrupt:
        _remove_staging(out)
        raise


def _inpaint_one(model: Inpainter, path: Path, index: int, out: Path, cfg: SampleConfig, masks: MasksConfig,
                 mask: str, hole_is_white: bool) -> dict:
    """Write one image's results into a hidden folder, then swap it in for `out/<name>/`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = load_image(path)
        alpha = load_alpha(path)
        hole = user_mask(mask, path, image.shape[:2], masks, seed=cfg.seed, index=index, hole_is_white=hole_is_white)
    notes = [str(w.message) for w in caught]
    if not hole.any():
        notes.append("the mask has no visible pixel: the samples are unconditional")
    if alpha is not None:
        notes.append(f"alpha channel: {ALPHA_POLICY}")
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=STAGING, dir=out))
    try:
        thumbs = []
        for i, result in enumerate(model.iter_inpaint(image, hole, cfg, cfg.samples, cfg.seed)):
            picture = Image.fromarray(result) if alpha is None else Image.fromarray(np.dstack([result, alpha]), "RGBA")
            picture.save(staging / f"sample_{i:02d}.png", compress_level=1)  # huge images: fast, still lossless
            thumbs.append(_thumb(result))
        small_hole = _thumb(hole * np.uint8(255), Image.Resampling.NEAREST) > 127
        grid(inpainting_row(_thumb(image), small_hole, thumbs), cols=2 + len(thumbs)).save(staging / "grid.png")
        target, old = out / path.name, out / f".{path.name}.old{STAGING}"
        _remove(old)
        if target.exists():
            target.rename(old)
        staging.rename(target)
        _remove(old)
    except BaseException:
        _remove(staging)
        raise
    status = "unchanged: the mask has no hole" if hole.all() else f"{len(thumbs)} samples"
    return {"status": status, "notes": notes, "hole_ratio": float(1 - hole.mean()), "folder": str(out / path.name),
            "alpha": alpha is not None}


def inpaint_files(model: Inpainter, source: Path, out: Path, cfg: SampleConfig, masks: MasksConfig, *,
                  mask: str = "box", mask_white_is_visible: bool = False, runs: Path | None = None,
                  on_file: Callable[[Path, dict], None] = lambda path, outcome: None) -> dict:
    """Inpaint an image or every image of a folder into `out/<file name>/` (sample_XX.png and
    grid.png: input | masked | samples) with `mask` (see masks.user_mask); one file's failure
    does not stop the others. An image's folder appears whole or not at all (written hidden, then
    renamed), so a kill or SIGTERM leaves no half results; a failed image leaves no folder. After
    each image `out/settings.json` holds every setting and each file's outcome so far (also
    handed to `on_file`); `complete` says whether the run finished. Returns that report."""
    files = image_files(source)
    check_mask_option(mask, files)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_staging(out)  # a killed run's hidden folders
    settings = {**to_dict(cfg), "mask": mask, "mask_convention": "white = visible" if mask_white_is_visible
                else "white = hole", "runs": str(runs), "size_policy": f"resized to {model.size}x{model.size} for "
                "the model; hole pixels pasted back at full resolution; grid.png pictures fit in "
                f"{GRID_TILE}x{GRID_TILE}", "alpha": ALPHA_POLICY, "folders": FOLDERS}
    if mask == "box":
        settings["box"] = (f"centred hole of masks.box_fraction = {masks.box_fraction} of the height by "
                           f"{masks.box_fraction} of the width")
    report = {"settings": settings, "images": {}, "complete": False}
    with sigterm_stops(), _staging_removed_on_stop(out):
        for index, path in enumerate(files):
            try:
                outcome = _inpaint_one(model, path, index, out, cfg, masks, mask, not mask_white_is_visible)
            except (ValueError, OSError) as exc:
                _remove(out / path.name)  # an earlier run's results would pass for this run's
                outcome = {"status": FAILED, "error": str(exc)}
            report["images"][str(path)] = outcome
            report["complete"] = index == len(files) - 1
            atomic_write(out / "settings.json", json.dumps(report, indent=1).encode())
            on_file(path, outcome)
    return report


def print_outcome(path: Path, outcome: dict) -> None:
    if "error" in outcome:
        print(f"{path}: failed: {outcome['error']}", file=sys.stderr)
        return
    print(f"{path}: {outcome['status']} -> {outcome['folder']}", *(f"  note: {n}" for n in outcome["notes"]), sep="\n")


def run(params: dict, cfg: SampleConfig, source: Path, out: Path, runs: Path, *, mask: str = "box",
        mask_white_is_visible: bool = False, device: str | None = None) -> None:
    """The inpaint command: the mask option is checked before the model loads, each file's outcome
    is printed as it finishes, and a failed file fails the command once the others are done."""
    check_mask_option(mask, image_files(source))
    model = Inpainter.from_runs(runs, device)
    report = inpaint_files(model, source, out, cfg, section(params, "masks"), mask=mask,
                           mask_white_is_visible=mask_white_is_visible, runs=runs, on_file=print_outcome)
    failed = sum(r["status"] == FAILED for r in report["images"].values())
    if failed:
        raise RuntimeError(f"{failed} of {len(report['images'])} images failed (see {Path(out) / 'settings.json'})")
