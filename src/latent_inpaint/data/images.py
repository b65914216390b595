"""Decoding any photograph into an RGB square of the training size."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class SkipImage(Exception):
    """The file cannot be used; the message is the reason recorded in the manifest."""


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own convert("L") clips 16-bit values at 255, turning most photos white.
        arr = np.asarray(im, dtype=np.float64)
        peak = arr.max(initial=0.0)
        if im.mode == "F" and peak <= 1.0:
            arr = arr * 255.0
        elif peak > 255.0:
            arr = arr / 257.0
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels carry arbitrary colour (often black): show them on white instead.
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """Open, apply the EXIF orientation and convert to 8-bit RGB, or raise SkipImage."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except UnidentifiedImageError:
        raise SkipImage("not an image Pillow can identify") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipImage(f"too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise SkipImage(f"cannot decode: {exc}") from None


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (Lanczos), then the centred size x size square."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def prepare_image(path: Path, size: int, min_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """The training square of one file and its original (width, height)."""
    im = load_rgb(path)
    if min(im.size) < min_side:
        raise SkipImage(f"too small: {im.size[0]}x{im.size[1]}, shorter side below min_side={min_side}")
    return resize_center_crop(im, size), im.size


def encode(im: Image.Image, image_format: str, jpeg_quality: int) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        im.save(buf, format="PNG", compress_level=6)
    else:
        im.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """Encoded shard image -> (H, W, 3) uint8."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))
