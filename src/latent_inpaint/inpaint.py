"""Inference: the four trained parts turn (image, mask) into pluralistic samples.

    E (restrictive encoder) on X⊙M  -> tokens at visible token positions, token mask M̂
    T (transformer), k sampling steps -> a token for every masked position (a new draw per sample)
    VQGAN codebook                   -> Z, the codebook vectors of the full token map
    decoder (E_prt + coupling + G)   -> X' ; output = X⊙M + X'⊙(1-M)

Images of any size and aspect: the model works at its training size S, so the image and mask
are resized to S x S (aspect not kept), inpainted, the result is resized back to the original
size, and only the hole pixels take it: every visible pixel of the original stays bit-identical.
Nothing at full size is held as floats, and one full-size sample at a time, so memory and time
grow with the pixel count only through uint8 resizes and PNG writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .config import MasksConfig, SampleConfig, section, to_dict
from .data.images import IMAGE_EXTENSIONS, SkipImage, load_rgb
from .decoder import InpaintDecoder, OfficialDecoder, VanillaDecoder
from .encoder import MiracleEncoder, OfficialRestrictiveEncoder, RestrictiveEncoder, VanillaEncoder
from .files import atomic_write
from .masks import KINDS, load_mask, user_mask
from .pictures import grid, inpainting_row
from .refiner import Refiner
from .sampler import sample
from .saved import load_model, saved_spec
from .stopping import sigterm_stops
from .transformer import BidirectionalTransformer, OfficialTransformer
from .usage import UsageError
from .vqgan import VQModel

BATCH = 8  # samples drawn in one forward pass
FAILED = "failed"  # the status of a file that could not be inpainted


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """The device named, else the local GPU if there is one."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclasses.dataclass
class Inpainter:
    vqgan: torch.nn.Module
    encoder: torch.nn.Module
    transformer: torch.nn.Module
    decoder: torch.nn.Module
    size: int
    device: torch.device
    refiner: torch.nn.Module | None = None  # the released models' refinement network, if imported

    @classmethod
    def from_runs(cls, runs_dir: Path = Path("runs"), device: str | torch.device | None = None,
                  encoder: str = "encoder", decoder: str = "decoder", alpha: float | None = None) -> Inpainter:
        """Load runs/{vqgan,<encoder>,transformer,<decoder>} (trained, or pulled with DVC); each
        saved model rebuilds itself from the config saved beside its weights.

        encoder: a trained encoder's run folder name ("encoder", "encoder_vanilla") or "miracle"
        (the VQGAN's tokens of the full image under M̂: ablation); decoder: "decoder" or "vanilla"
        (tokens decoded by the VQGAN decoder and pasted: ablation); alpha: another threshold for
        the restrictive encoder at inference (its weights do not depend on alpha)."""
        runs_dir, device = Path(runs_dir), pick_device(device)
        vqgan = load_model(runs_dir / "vqgan", VQModel, device=device)
        if encoder == "miracle":
            trained_alpha = saved_spec(runs_dir / "encoder")["encoder"]["alpha"]
            enc = MiracleEncoder(vqgan, trained_alpha if alpha is None else alpha)
        else:
            overrides = None if alpha is None else {"encoder": {"alpha": alpha}}
            enc = load_model(runs_dir / encoder, (RestrictiveEncoder, VanillaEncoder, OfficialRestrictiveEncoder),
                             device=device, overrides=overrides)
        tf = load_model(runs_dir / "transformer", (BidirectionalTransformer, OfficialTransformer), device=device)
        dec = VanillaDecoder(vqgan) if decoder == "vanilla" else load_model(
            runs_dir / decoder, (InpaintDecoder, OfficialDecoder), device=device)
        parts = [m.to(device).eval() for m in (vqgan, enc, tf, dec)]
        # runs/refiner exists only for the authors' released models (`import-official`).
        refiner = (load_model(runs_dir / "refiner", Refiner, device=device)
                   if decoder != "vanilla" and (runs_dir / "refiner" / "final" / "config.json").is_file() else None)
        return cls(*parts, size=vqgan.resolution, device=device, refiner=refiner)

    @torch.no_grad()
    def inpaint_batch(self, x: torch.Tensor, mask: torch.Tensor, cfg: SampleConfig, seeds: list[int]) -> torch.Tensor:
        """x (B, 3, S, S) in [-1, 1], mask (B, 1, S, S) 1 = visible -> (B, 3, S', S'), one sample per
        row drawn with that row's seed; S' = S, or the refiner's output side (512 for places512)."""
        x, mask = x.to(self.device), mask.to(self.device)
        logits, token_mask = self.encoder(x, mask)  # (B, K, h, w), (B, h, w)
        b, _, h, w = logits.shape
        tokens = logits.argmax(1).flatten(1)  # (B, N): the encoder's tokens where visible
        visible = token_mask.flatten(1)
        tokens = sample(self.transformer, tokens, visible, steps=cfg.steps, temperature=cfg.temperature,
                        anneal=cfg.anneal, seeds=seeds)
        z_q = self.vqgan.quantize.lookup(tokens.view(b, h, w))  # (B, embed_dim, h, w)
        composite, _ = self.decoder(x * mask, mask, z_q, token_mask)
        composite = x * mask + composite * (1 - mask)  # visible pixels exactly the input's
        if self.refiner is None:
            return composite
        side = self.refiner.size_out
        x_out = x if side == x.shape[-1] else F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
        return self.refiner.refine(composite, x_out, mask)  # (B, 3, side, side)

    def inpaint(self, image: np.ndarray, mask: np.ndarray, cfg: SampleConfig, samples: int, seed: int) -> list[np.ndarray]:
        """image (H, W, 3) uint8, mask (H, W) 1 = visible -> `samples` (H, W, 3) uint8 results at
        the original size (visible pixels untouched)."""
        return list(self.iter_inpaint(image, mask, cfg, samples, seed))

    def iter_inpaint(self, image: np.ndarray, mask: np.ndarray, cfg: SampleConfig, samples: int,
                     seed: int) -> Iterator[np.ndarray]:
        """`inpaint`'s results one at a time: the model works at S x S, each sample is resized
        up as uint8 and pasted into the hole (tile-free), one full-size array at a time."""
        if mask.all():
            yield from (image.copy() for _ in range(samples))  # nothing to fill
            return
        h, w = mask.shape
        square = (self.size, self.size)
        small = np.asarray(Image.fromarray(image).resize(square, Image.Resampling.BICUBIC, reducing_gap=3.0))
        xs = torch.from_numpy(small.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, S, S)
        # A model pixel is visible only where all the original pixels it covers are: never invent there.
        hole = torch.from_numpy(mask == 0)[None, None].float()  # (1, 1, H, W)
        ms = 1 - F.adaptive_max_pool2d(hole, square)  # (1, 1, S, S)
        del hole
        keep = mask.astype(bool)[..., None]  # (H, W, 1)
        for first in range(0, samples, BATCH):
            n = min(BATCH, samples - first)
            seeds = [seed + first + i for i in range(n)]
            y = self.inpaint_batch(xs.expand(n, -1, -1, -1), ms.expand(n, -1, -1, -1), cfg, seeds).cpu()
            y = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # (n, S, S, 3)
            for one in y:
                full = np.asarray(Image.fromarray(one).resize((w, h), Image.Resampling.BICUBIC))  # (H, W, 3)
                yield np.where(keep, image, full)


# ---------------------------------------------------------------------------------- user files

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
