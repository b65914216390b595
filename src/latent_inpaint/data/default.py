"""The embedded default dataset: deterministic crops of the photographs scikit-image ships.

They let `snakemake --cores all` run end to end with no data given, offline. Only images bundled
inside the scikit-image wheel are used (others would be downloaded at run time).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

# Natural photographs and textures bundled with scikit-image (greyscale ones become RGB).
PHOTOGRAPHS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "camera", "moon", "brick", "grass", "gravel", "coins", "clock",
)


def _photographs() -> list[tuple[str, Image.Image]]:
    import skimage.data

    out = []
    for name in PHOTOGRAPHS:
        arr = getattr(skimage.data, name)()
        out.append((name, Image.fromarray(arr).convert("RGB")))
    left, _right, _disp = skimage.data.stereo_motorcycle()
    out.append(("motorcycle", Image.fromarray(left).convert("RGB")))
    return out


def build_default_dataset(out_dir: Path, count: int, size: int, seed: int) -> list[Path]:
    """Write `count` PNG crops (shorter side `size`, aspect 3:4..4:3) into `out_dir`."""
    if count < 3:
        raise ValueError(f"data.default_count must be at least 3 (one image per split), got {count}")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    photos = _photographs()
    paths = []
    for i in range(count):
        name, photo = photos[i % len(photos)]
        w, h = photo.size
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        side = rng.uniform(0.3, 0.9) * min(w, h)  # crop height; width follows the aspect
        cw, ch = min(w, round(side * aspect)), min(h, round(side))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = size / min(cw, ch)
        crop = crop.resize((max(size, round(cw * scale)), max(size, round(ch * scale))), Image.Resampling.LANCZOS)
        path = tmp / f"{i:05d}_{name}.png"
        crop.save(path, compress_level=6)
        paths.append(out_dir / path.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # the folder appears complete or not at all
    return paths
