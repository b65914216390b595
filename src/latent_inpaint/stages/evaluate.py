"""Evaluation (paper Sec. 4): FID for small, large and box masks on the test split with the fixed
mask sets, hole-region L1/PSNR and SSIM, and LPIPS diversity under the box mask; for our model
and for a classical reference (biharmonic inpainting) that nobody here trained."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..config import EvaluateConfig, SampleConfig, WeightsConfig
from ..data.images import decode
from ..data.ingest import shard_paths
from ..evaluate.baseline import biharmonic_inpaint
from ..evaluate.fid import FID
from ..evaluate.metrics import diversity, diversity_summary, hole_l1, hole_psnr, ssim
from ..losses import STAND_IN, load_lpips
from ..masks import KINDS, load_mask

# (image uint8 (H, W, 3), mask (H, W) 1 = visible, samples, seed) -> samples x (H, W, 3) uint8
Method = Callable[[np.ndarray, np.ndarray, int, int], list[np.ndarray]]


def test_images(shards_dir: Path, split: str, limit: int) -> list[tuple[str, np.ndarray]]:
    """The first `limit` (key, image) pairs of a split, in key order."""
    out = []
    for tar_path in shard_paths(shards_dir, split):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith((".png", ".jpg")):
                    out.append((member.name.rsplit(".", 1)[0], decode(tar.extractfile(member).read())))
                    if len(out) == limit:
                        return out
    return out


def ours(inpainter, sample: SampleConfig) -> Method:
    return lambda image, mask, samples, seed: inpainter.inpaint(image, mask, sample, samples, seed)


def biharmonic(image: np.ndarray, mask: np.ndarray, samples: int, seed: int) -> list[np.ndarray]:
    return [biharmonic_inpaint(image, mask)] * samples  # deterministic: every "sample" is the same


def evaluate_methods(methods: dict[str, Method], shards_dir: Path, masks_dir: Path, cfg: EvaluateConfig,
                     weights: WeightsConfig, device: str = "cpu", split: str = "test",
                     kinds: tuple[str, ...] = KINDS, with_diversity: bool = True) -> dict:
    """{method: {"<kind>": {"fid", "hole_l1", "hole_psnr", "ssim"}, "diversity": [mean, std]}},
    plus which numbers rest on stand-in weights."""
    images = test_images(shards_dir, split, max(cfg.fid_images, cfg.diversity_images))
    if len(images) < 2:
        raise ValueError(f"{shards_dir}: the {split} split has {len(images)} image(s); FID needs at least 2")
    fid = FID(weights.inception, device=device, batch_size=cfg.batch_size, dims=cfg.fid_dims)
    scored = images[: cfg.fid_images]
    real_features = fid.features(np.stack([im for _, im in scored]))
    lpips = load_lpips(weights.vgg16) if with_diversity else None
    results: dict = {}
    for name, method in methods.items():
        results[name] = {}
        for kind in kinds:
            outputs, l1s, psnrs, ssims = [], [], [], []
            for index, (key, image) in enumerate(scored):
                mask = load_mask(masks_dir / split / kind / f"{key}.png", hole_is_white=False)
                (out,) = method(image, mask, 1, index)
                outputs.append(out)
                l1s.append(hole_l1(out, image, mask))
                psnrs.append(hole_psnr(out, image, mask))
                ssims.append(ssim(out, image))
            results[name][kind] = {
                "fid": fid.fid(real_features, fid.features(np.stack(outputs))),
                "hole_l1": float(np.mean(l1s)), "hole_psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)),
            }
        if with_diversity:
            scores = []
            for index, (key, image) in enumerate(images[: cfg.diversity_images]):
                mask = load_mask(masks_dir / split / "box" / f"{key}.png", hole_is_white=False)
                scores.append(diversity(method(image, mask, cfg.diversity_samples, 1000 * index), lpips))
            results[name]["diversity"] = list(diversity_summary(scores))
    results["stand_in"] = [w for w in ("inception", "vgg16") if getattr(weights, w) == STAND_IN]
    results["fid_dims"] = cfg.fid_dims
    results["images"] = {"fid": len(scored), "diversity": min(len(images), cfg.diversity_images),
                         "samples": cfg.diversity_samples}
    return results


def table_rows(results: dict) -> tuple[dict, list[str]]:
    """Rows and columns shaped like the paper's Table 1 (FID per mask, box diversity), for the
    mask types and measures the results hold."""
    methods = {m: r for m, r in results.items() if isinstance(r, dict) and any(k in r for k in KINDS)}
    kinds = [k for k in KINDS if any(k in r for r in methods.values())]
    columns = [*(f"FID {k}" for k in kinds), "diversity (box)", *(f"hole PSNR {k}" for k in kinds)]
    rows = {}
    for method, r in methods.items():
        rows[method] = {**{f"FID {k}": r[k]["fid"] for k in kinds if k in r},
                        **{f"hole PSNR {k}": r[k]["hole_psnr"] for k in kinds if k in r}}
        if "diversity" in r:
            rows[method]["diversity (box)"] = tuple(r["diversity"])
    return rows, columns


def sample_grid(method: Method, shards_dir: Path, masks_dir: Path, count: int, samples: int) -> Image.Image:
    """Pluralistic samples side by side, like the paper's Figure 5 lower half: per row an input,
    the masked input (box), then the samples."""
    from ..pictures import grid

    tiles = []
    for index, (key, image) in enumerate(test_images(shards_dir, "test", count)):
        mask = load_mask(masks_dir / "test" / "box" / f"{key}.png", hole_is_white=False)
        masked = np.where(mask[..., None].astype(bool), image, np.uint8(128))
        tiles += [image, masked, *method(image, mask, samples, 1000 * index)]
    return grid(tiles, cols=2 + samples)
