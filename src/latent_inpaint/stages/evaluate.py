"""Evaluation (paper Sec. 4): FID for small, large and box masks on the test split with the fixed
mask sets, hole-region L1/PSNR and SSIM, and LPIPS diversity under the box mask; for our model
and for a classical reference (biharmonic inpainting) that nobody here trained, on the first
evaluate.baseline_images test images. Also the ablations (paper Tables 2 and 3): one variant of
the trained model per name, see ABLATIONS, all in one process (`run_ablations`) that loads the
Inception network, the real images' features and each distinct model once.

Streaming: the test images are read, inpainted and scored evaluate.batch_size at a time; what
stays is FID's FeatureStats (at most fid_dims^2 floats each), running sums of the hole metrics
and one diversity score per image, so memory does not grow with the test set. Each finished
part (a mask type or the diversity, per method) is written at once to `<out>.partial`, keyed by
everything that determines it (variant, params, device, the models' final/ files, shards, masks,
the code); a rerun after a kill skips the parts it finds there under the same key and gives the
same metrics JSON as an uninterrupted run. A partial file under another key is ignored."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..config import ABLATIONS, ConfigError, EvaluateConfig, SampleConfig, WeightsConfig, section, to_dict
from ..data.ingest import iter_shard_images, shards_fingerprint, split_keys
from ..evaluate.baseline import biharmonic_inpaint
from ..evaluate.fid import FID, FeatureStats
from ..evaluate.metrics import diversity, diversity_summary, hole_l1, hole_psnr, ssim
from ..evaluate.report import table_markdown, write_metrics_json
from ..files import atomic_write, sha256_file
from ..inpaint import Inpainter, pick_device
from ..losses import load_lpips
from ..masks import KINDS, read_eval_mask
from ..pictures import grid, inpainting_row
from ..tracking import stage_run, tracking_config
from ..weights import stand_ins

# (images uint8 (H, W, 3), masks (H, W) 1 = visible, samples, one seed per image)
#   -> per image `samples` x (H, W, 3) uint8
Method = Callable[[list[np.ndarray], list[np.ndarray], int, list[int]], list[list[np.ndarray]]]
Batch = tuple[list[int], list[np.ndarray], list[np.ndarray]]  # (indices in the split, images, masks)

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
    return lambda images, masks, samples, seeds: inpainter.inpaint_many(images, masks, sample, samples, seeds)


def biharmonic(images: list[np.ndarray], masks: list[np.ndarray], samples: int,
               seeds: list[int]) -> list[list[np.ndarray]]:
    # deterministic: every "sample" of an image is the same fill
    return [[biharmonic_inpaint(image, mask)] * samples for image, mask in zip(images, masks)]


def masked_batches(shards_dir: Path, masks_dir: Path, split: str, kind: str, count: int,
                   batch_size: int) -> Iterator[Batch]:
    """The first `count` images of a split with their fixed evaluation masks of `kind`,
    `batch_size` at a time; only the batch at hand is ever decoded."""
    batch = []
    for index, (key, image) in enumerate(iter_shard_images(shards_dir, split, count)):
        batch.append((index, image, read_eval_mask(masks_dir, split, kind, key)))
        if len(batch) == batch_size:
            yield tuple(map(list, zip(*batch)))
            batch = []
    if batch:
        yield tuple(map(list, zip(*batch)))


def score_kind(method: Method, batches: Iterator[Batch], fid: FID,
               real: FeatureStats | None = None) -> tuple[dict, FeatureStats]:
    """One sample per image (seeded by its index): FID against the real images and the mean hole
    L1/PSNR and SSIM, batch by batch. The real images' FeatureStats are gathered on the way unless
    given; returned for the next mask type."""
    fake, gathered = FeatureStats(fid.dims), None if real is not None else FeatureStats(fid.dims)
    sums, count = np.zeros(3), 0
    for indices, images, masks in batches:
        outputs = [out for (out,) in method(images, masks, 1, indices)]
        fake.add(fid.features(np.stack(outputs)))
        if gathered is not None:
            gathered.add(fid.features(np.stack(images)))
        sums += np.sum([(hole_l1(o, i, m), hole_psnr(o, i, m), ssim(o, i))
                        for o, i, m in zip(outputs, images, masks)], axis=0)
        count += len(images)
    real = real if real is not None else gathered
    l1, psnr, ssim_mean = sums / count
    return {"fid": fid.fid(real, fake), "hole_l1": float(l1), "hole_psnr": float(psnr), "ssim": float(ssim_mean)}, real


def score_diversity(method: Method, batches: Iterator[Batch], samples: int, lpips) -> list[float]:
    """(mean, std) over images of the mean pairwise LPIPS of `samples` samples per image (seeds
    1000 x index)."""
    scores = [diversity(drawn, lpips) for indices, images, masks in batches
              for drawn in method(images, masks, samples, [1000 * i for i in indices])]
    return list(diversity_summary(scores))


class Progress:
    """The finished parts of one evaluation ({method: {kind or "diversity": result}}), rewritten
    atomically to `path` as each finishes, under the key of the inputs they were computed from.
    Parts found there under the same key are taken as done; under another key, or unreadable,
    the file is ignored and replaced by the first part that finishes."""

    def __init__(self, path: Path | None, key: str):
        self.path, self.key, self.done = path, key, {}
        if path is not None and path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                saved = {}
            if isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("done"), dict):
                self.done = saved["done"]
        self.resumed = sum(len(parts) for parts in self.done.values())

    def get(self, method: str, part: str):
        return self.done.get(method, {}).get(part)

    def put(self, method: str, part: str, result) -> None:
        self.done.setdefault(method, {})[part] = result
        if self.path is not None:
            write_metrics_json(self.path, {"key": self.key, "done": self.done})

    def finish(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def partial_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".partial")


def inputs_key(settings: Mapping, runs: Path, shards: Path, masks: Path) -> str:
    """A digest of what an evaluation's numbers depend on: `settings` (variant, params, device),
    the identity (path, size, mtime) of every runs/*/final/ file, the shards' and masks' manifests
    and this package's code."""
    package = Path(__file__).resolve().parents[1]
    models = sorted((str(f.relative_to(runs)), f.stat().st_size, f.stat().st_mtime_ns)
                    for f in Path(runs).glob("*/final/*") if f.is_file())
    code = hashlib.sha256()
    for f in sorted(package.rglob("*.py")):
        code.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes())
    manifest = Path(masks) / "manifest.json"
    key = {"settings": settings, "models": models, "shards": shards_fingerprint(shards),
           "masks": sha256_file(manifest) if manifest.is_file() else None, "code": code.hexdigest()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def evaluate_methods(methods: dict[str, Method], shards_dir: Path, masks_dir: Path, cfg: EvaluateConfig,
                     weights: WeightsConfig, device: str = "cpu", split: str = "test",
                     kinds: tuple[str, ...] = KINDS, with_diversity: bool = True,
                     limits: Mapping[str, int] | None = None, progress: Progress | None = None,
                     fid: FID | None = None, real: dict[int, FeatureStats] | None = None) -> dict:
    """{method: {"<kind>": {"fid", "hole_l1", "hole_psnr", "ssim"}, "diversity": [mean, std]}},
    plus which numbers rest on stand-in weights and how many images each used. `limits`: at most
    that many images for a method (the baseline's subset); `progress`: parts already done are
    taken from it, and each part is put there as it finishes. `fid` and `real` (the real images'
    features by image count, filled as they are computed) may be shared between calls on the
    same split."""
    limits, progress = limits or {}, progress or Progress(None, "")
    available = len(split_keys(shards_dir, split))
    limits = {name: limits[name] for name in methods if name in limits}
    if min(available, cfg.fid_images, *limits.values()) < 2:
        raise ValueError(f"{shards_dir}: the {split} split has {available} image(s) (at most {cfg.fid_images}, "
                         f"{limits or 'no other limit'}); FID needs at least 2")
    fid = fid or FID(weights.inception, device=device, batch_size=cfg.batch_size, dims=cfg.fid_dims)
    lpips = None
    real = {} if real is None else real  # by image count: the baseline's subset has its own
    results: dict = {}
    for name, method in methods.items():
        results[name] = {}
        limit = min(available, limits.get(name, available))
        count = min(cfg.fid_images, limit)
        for kind in kinds:
            if progress.get(name, kind) is None:
                batches = masked_batches(shards_dir, masks_dir, split, kind, count, cfg.batch_size)
                scores, real[count] = score_kind(method, batches, fid, real.get(count))
                progress.put(name, kind, scores)
            results[name][kind] = progress.get(name, kind)
        if with_diversity:
            if progress.get(name, "diversity") is None:
                if lpips is None:
                    lpips = load_lpips(weights.vgg16).to(device)
                # about batch_size samples per call, however many each image draws
                per_call = max(1, cfg.batch_size // cfg.diversity_samples)
                batches = masked_batches(shards_dir, masks_dir, split, "box", min(cfg.diversity_images, limit),
                                         per_call)
                progress.put(name, "diversity", score_diversity(method, batches, cfg.diversity_samples, lpips))
            results[name]["diversity"] = progress.get(name, "diversity")
    results["stand_in"] = stand_ins(weights)
    results["fid_dims"] = cfg.fid_dims
    results["images"] = {"fid": min(available, cfg.fid_images),
                         "diversity": min(available, cfg.diversity_images), "samples": cfg.diversity_samples}
    if BASELINE in methods:
        results["images"]["baseline"] = min(available, cfg.fid_images, limits.get(BASELINE, available))
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
    for indices, images, masks in masked_batches(shards_dir, masks_dir, "test", "box", count, count):
        for image, mask, drawn in zip(images, masks, method(images, masks, samples, [1000 * i for i in indices])):
            tiles += inpainting_row(image, mask, drawn)
    return grid(tiles, cols=2 + samples)


def run(params: dict, variant: str, runs: Path, shards: Path, masks: Path, out: Path, *, table: Path | None = None,
        kinds: tuple[str, ...] = KINDS, diversity: bool = True, baseline: bool = False, ablation: bool = False,
        device: str | None = None) -> str:
    """Score one variant of the trained model (see ABLATIONS; "full" is the model as trained) and,
    with `baseline` or variant "biharmonic", the classical reference; write the metrics JSON (and
    the Markdown table to `table`), log them; return a summary (with the table). `ablation`:
    FID on the first evaluate.ablation_images test images (the paper's Table 2 subset). Finished
    parts are kept in `<out>.partial` until the JSON is written: a rerun after a kill resumes."""
    cfg, sample, weights = (section(params, name) for name in ("evaluate", "sample", "weights"))
    if ablation:
        cfg = dataclasses.replace(cfg, fid_images=cfg.ablation_images)
    device = pick_device(device)
    methods = variant_methods(variant, Path(runs), device, sample, baseline=baseline)
    # The run's params are the pipeline's; a variant's own setting is in its stage name.
    logged = {"sample": to_dict(sample), "evaluate": to_dict(cfg)}
    progress = Progress(partial_path(out), variant_key(variant, logged, weights, device, runs, shards, masks))
    with stage_run(f"evaluate_{variant.replace('.', '_')}", tracking_config(params), logged) as tracker:
        results = evaluate_methods(methods, Path(shards), Path(masks), cfg, weights, str(device), kinds=kinds,
                                   with_diversity=diversity, limits={BASELINE: cfg.baseline_images},
                                   progress=progress)
        results["variant"] = variant
        write_metrics_json(out, results)
        progress.finish()
        log_scores(tracker, results)
        lines = []
        if table:
            rows, columns = table_rows(results)
            text = table_markdown(rows, columns, f"Inpainting on the test split ({images_title(results['images'])})",
                                  stand_in=results["stand_in"])
            atomic_write(Path(table), text.encode())  # a killed job leaves no half table
            lines.append(text)
    if progress.resumed:
        lines.append(f"resumed {progress.resumed} finished part(s) from {partial_path(out)}")
    return "\n".join([*lines, f"metrics written to {out}"])


def run_ablations(params: dict, variants: list[str] | None, runs: Path, shards: Path, masks: Path, out_dir: Path,
                  *, device: str | None = None) -> str:
    """Score ablation variants (default: evaluate.ablations; the paper's Tables 2 and 3) in one process:
    for each, `<out_dir>/<variant>.json` with the numbers `run(params, variant, ..., kinds=("box",),
    diversity=False, ablation=True)` writes. What no variant changes is done once: the imports,
    the Inception network, the real images' features and each distinct model (the temperature
    variants sample one). Every variant's finished parts stay in its `.partial` file until the
    last JSON is written, so a rerun after a kill, which finds no JSON (Snakemake deletes a failed
    job's outputs), recomputes none of them."""
    cfg, sample, weights = (section(params, name) for name in ("evaluate", "sample", "weights"))
    variants = list(variants or cfg.ablations)
    cfg = dataclasses.replace(cfg, fid_images=cfg.ablation_images)
    for variant in variants:  # a misspelt name fails now, not after minutes of the others
        if variant != "biharmonic":
            parse_variant(variant, sample)
    device, out_dir = pick_device(device), Path(out_dir)
    logged = {"sample": to_dict(sample), "evaluate": to_dict(cfg)}
    fid = FID(weights.inception, device=str(device), batch_size=cfg.batch_size, dims=cfg.fid_dims)
    real: dict[int, FeatureStats] = {}
    loaded: dict[str, Inpainter] = {}
    progresses, lines = [], []
    with stage_run("ablations", tracking_config(params), logged) as tracker:
        for variant in variants:
            out = out_dir / f"{variant}.json"
            methods = variant_methods(variant, Path(runs), device, sample, loaded=loaded)
            progress = Progress(partial_path(out), variant_key(variant, logged, weights, device, runs, shards, masks))
            results = evaluate_methods(methods, Path(shards), Path(masks), cfg, weights, str(device), kinds=("box",),
                                       with_diversity=False, limits={BASELINE: cfg.baseline_images},
                                       progress=progress, fid=fid, real=real)
            results["variant"] = variant
            write_metrics_json(out, results)
            log_scores(tracker, results, f"{variant}/")
            progresses.append(progress)
            box = next(r["box"] for r in results.values() if isinstance(r, dict) and "box" in r)
            lines.append(f"{variant}: FID {box['fid']:.2f}, hole PSNR {box['hole_psnr']:.2f} dB"
                         + (" (resumed)" if progress.resumed else ""))
        for progress in progresses:
            progress.finish()
    return "\n".join([*lines, f"{len(variants)} ablation(s) written to {out_dir}"])


def variant_methods(variant: str, runs: Path, device, sample: SampleConfig, baseline: bool = False,
                    loaded: dict[str, Inpainter] | None = None) -> dict[str, Method]:
    """What one evaluation scores: the trained model as `variant` changes it ("full": as trained)
    and, with `baseline` or variant "biharmonic", the classical reference. `loaded`: the models
    by their load options, shared between calls."""
    loaded = {} if loaded is None else loaded
    methods: dict[str, Method] = {}
    if variant != "biharmonic":
        options, variant_sample = parse_variant(variant, sample)
        key = json.dumps(options, sort_keys=True)
        if key not in loaded:
            loaded[key] = Inpainter.from_runs(runs, device, **options)
        methods[OURS if variant == "full" else variant] = ours(loaded[key], variant_sample)
    if baseline or variant == "biharmonic":
        methods[BASELINE] = biharmonic
    return methods


def variant_key(variant: str, logged: dict, weights: WeightsConfig, device, runs: Path, shards: Path,
                masks: Path) -> str:
    settings = {"variant": variant, **logged, "weights": to_dict(weights), "device": str(device)}
    return inputs_key(settings, Path(runs), Path(shards), Path(masks))


def log_scores(tracker, results: dict, prefix: str = "") -> None:
    """Every method's numbers as metrics `<prefix><method>/<kind>/<measure>`."""
    for method, r in results.items():
        if isinstance(r, dict):
            name = re.sub(r"[^\w\-. ]", "", method).strip()  # MLflow's allowed metric characters
            tracker.log_metrics({f"{prefix}{name}/{k}/{m}": v for k, ms in r.items() if isinstance(ms, dict)
                                 for m, v in ms.items()})


def images_title(images: dict) -> str:
    """"12 images", or "36500 images; biharmonic (classical) on the first 500" for a baseline subset."""
    title = f"{images['fid']} images"
    if images.get("baseline", images["fid"]) < images["fid"]:
        title += f"; {BASELINE} on the first {images['baseline']}"
    return title
