"""Evaluation (paper Sec. 4): FID for small, large and box masks on the test split with the fixed
mask sets, hole-region L1/PSNR and SSIM, and LPIPS diversity under the box mask; for our model
and for a classical reference (biharmonic inpainting) that nobody here trained. Also the
ablations (paper Tables 2 and 3): one variant of the trained model per name, see ABLATIONS."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..config import ABLATIONS, ConfigError, EvaluateConfig, SampleConfig, WeightsConfig, section, to_dict
from ..data.ingest import shard_images
from ..evaluate.baseline import biharmonic_inpaint
from ..evaluate.fid import FID
from ..evaluate.metrics import diversity, diversity_summary, hole_l1, hole_psnr, ssim
from ..evaluate.report import table_markdown, write_metrics_json
from ..files import atomic_write
from ..inpaint import Inpainter, pick_device
from ..losses import load_lpips
from ..masks import KINDS, read_eval_mask
from ..pictures import grid, inpainting_row
from ..tracking import stage_run, tracking_config
from ..weights import stand_ins

# (image uint8 (H, W, 3), mask (H, W) 1 = visible, samples, seed) -> samples x (H, W, 3) uint8
Method = Callable[[np.ndarray, np.ndarray, int, int], list[np.ndarray]]

OURS, BASELINE = "ours", "biharmonic (classical)"
_FIXED = {"full": {}, "vanilla_encoder": {"encoder": "encoder_vanilla"}, "miracle_encoder": {"encoder": "miracle"},
          "vanilla_decoder": {"decoder": "vanilla"}}


def parse_variant(name: str, sample: SampleConfig) -> tuple[dict, SampleConfig]:
    """An ablation's name (see ABLATIONS) -> (Inpainter.from_runs options, sampling settings)."""
    try:
        if name in _FIXED:
            return _FIXED[name], sample
        if name.startswith("alpha"):
            return {"alpha": float(name[5:])}, sample
        if name.startswith("t"):
            return {}, dataclasses.replace(sample, temperature=float(name[1:]))
    except ValueError:
        pass
    raise ConfigError(f"unknown ablation {name!r}: use {ABLATIONS}")


def ours(inpainter: Inpainter, sample: SampleConfig) -> Method:
    return lambda image, mask, samples, seed: inpainter.inpaint(image, mask, sample, samples, seed)


def biharmonic(image: np.ndarray, mask: np.ndarray, samples: int, seed: int) -> list[np.ndarray]:
    return [biharmonic_inpaint(image, mask)] * samples  # deterministic: every "sample" is the same


def masked_images(images: list[tuple[str, np.ndarray]], masks_dir: Path, split: str, kind: str):
    """(index, image, its fixed evaluation mask of `kind`) for each (key, image) of a split."""
    for index, (key, image) in enumerate(images):
        yield index, image, read_eval_mask(masks_dir, split, kind, key)


def evaluate_methods(methods: dict[str, Method], shards_dir: Path, masks_dir: Path, cfg: EvaluateConfig,
                     weights: WeightsConfig, device: str = "cpu", split: str = "test",
                     kinds: tuple[str, ...] = KINDS, with_diversity: bool = True) -> dict:
    """{method: {"<kind>": {"fid", "hole_l1", "hole_psnr", "ssim"}, "diversity": [mean, std]}},
    plus which numbers rest on stand-in weights."""
    images = shard_images(shards_dir, split, max(cfg.fid_images, cfg.diversity_images))
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
            for index, image, mask in masked_images(scored, masks_dir, split, kind):
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
            scores = [diversity(method(image, mask, cfg.diversity_samples, 1000 * index), lpips)
                      for index, image, mask in masked_images(images[: cfg.diversity_images], masks_dir, split, "box")]
            results[name]["diversity"] = list(diversity_summary(scores))
    results["stand_in"] = stand_ins(weights)
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
    tiles = []
    for index, image, mask in masked_images(shard_images(shards_dir, "test", count), masks_dir, "test", "box"):
        tiles += inpainting_row(image, mask, method(image, mask, samples, 1000 * index))
    return grid(tiles, cols=2 + samples)


def run(params: dict, variant: str, runs: Path, shards: Path, masks: Path, out: Path, *, table: Path | None = None,
        kinds: tuple[str, ...] = KINDS, diversity: bool = True, baseline: bool = False, ablation: bool = False,
        device: str | None = None) -> str:
    """Score one variant of the trained model (see ABLATIONS; "full" is the model as trained) and,
    with `baseline` or variant "biharmonic", the classical reference; write the metrics JSON (and
    the Markdown table to `table`), log them; return a summary (with the table). `ablation`:
    FID on the first evaluate.ablation_images test images (the paper's Table 2 subset)."""
    cfg, sample, weights = (section(params, name) for name in ("evaluate", "sample", "weights"))
    if ablation:
        cfg = dataclasses.replace(cfg, fid_images=cfg.ablation_images)
    device = pick_device(device)
    methods: dict[str, Method] = {}
    if variant != "biharmonic":
        options, variant_sample = parse_variant(variant, sample)
        methods[OURS if variant == "full" else variant] = ours(Inpainter.from_runs(runs, device, **options),
                                                                  variant_sample)
    if baseline or variant == "biharmonic":
        methods[BASELINE] = biharmonic
    # The run's params are the pipeline's; a variant's own setting is in its stage name.
    logged = {"sample": to_dict(sample), "evaluate": to_dict(cfg)}
    with stage_run(f"evaluate_{variant.replace('.', '_')}", tracking_config(params), logged) as tracker:
        results = evaluate_methods(methods, Path(shards), Path(masks), cfg, weights, str(device), kinds=kinds,
                                   with_diversity=diversity)
        results["variant"] = variant
        write_metrics_json(out, results)
        for method, r in results.items():
            if isinstance(r, dict):
                name = re.sub(r"[^\w\-. ]", "", method).strip()  # MLflow's allowed metric characters
                tracker.log_metrics({f"{name}/{k}/{m}": v for k, ms in r.items() if isinstance(ms, dict)
                                     for m, v in ms.items()})
        lines = []
        if table:
            rows, columns = table_rows(results)
            text = table_markdown(rows, columns, f"Inpainting on the test split ({results['images']['fid']} images)",
                                  stand_in=results["stand_in"])
            atomic_write(Path(table), text.encode())  # a killed job leaves no half table
            lines.append(text)
    return "\n".join([*lines, f"metrics written to {out}"])
