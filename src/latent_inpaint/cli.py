"""`latent-inpaint`: one command, a subcommand per pipeline stage.

Every stage reads its hyperparameters from `params.yaml` (plus `--params` overlays and
`--set section.key=value`); Snakemake rules pass the sections they depend on as `--config-json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from .config import ConfigError, load_params, section, to_dict

def _params(args) -> dict:
    return load_params(args.params, args.set, args.config_json)


def _tracking(params: dict):
    from .tracking import tracking_config

    return tracking_config(params)


def cmd_default_data(args) -> None:
    from .data.default import build_default_dataset

    # Explicit flags (defaults from params) let the rule depend on these three keys alone.
    cfg = section(_params(args), "data") if None in (args.count, args.size, args.seed) else None
    count = args.count if args.count is not None else cfg.default_count
    size = args.size if args.size is not None else cfg.size
    seed = args.seed if args.seed is not None else cfg.default_seed
    paths = build_default_dataset(args.out, count, size, seed)
    print(f"wrote {len(paths)} images to {args.out}")


def cmd_prepare(args) -> None:
    from .data.default import build_default_dataset
    from .data.ingest import prepare
    from .pictures import shard_preview
    from .tracking import stage_run

    params = _params(args)
    cfg = section(params, "data")
    source = Path(args.source or cfg.source)
    if str(source) == "default":
        source = Path(args.default_dir)
        if not source.is_dir():
            build_default_dataset(source, cfg.default_count, cfg.size, cfg.default_seed)
    with stage_run("prepare", _tracking(params), {"data": to_dict(cfg)}) as run:
        start = time.perf_counter()
        manifest = prepare(cfg, source, Path(args.out), progress=not args.quiet)
        seconds = time.perf_counter() - start
        counts = {split: s["images"] for split, s in manifest["splits"].items()}
        run.log_metrics({
            "images_found": manifest["found"],
            "images_written": manifest["written"],
            "images_skipped": len(manifest["skipped"]),
            "images_per_s": manifest["found"] / seconds,
            **{f"images_{split}": n for split, n in counts.items()},
        })
        run.log_image(shard_preview(Path(args.out), "train"), "train_samples.png")
    print(
        f"{manifest['written']} images sharded into {args.out} "
        f"({', '.join(f'{k} {v}' for k, v in counts.items())}); "
        f"{len(manifest['skipped'])} skipped, listed in {Path(args.out) / 'manifest.json'}"
    )
    for skip in manifest["skipped"][:10]:
        print(f"  skipped {skip['path']}: {skip['reason']}")


def cmd_masks(args) -> None:
    from .data.ingest import read_manifest
    from .masks import write_eval_masks
    from .tracking import stage_run

    params = _params(args)
    cfg = section(params, "masks")
    size = read_manifest(Path(args.shards))["params"]["size"]
    with stage_run("masks", _tracking(params), {"masks": to_dict(cfg)}) as run:
        manifest = write_eval_masks(cfg, size, Path(args.shards), Path(args.out))
        for split, kinds in manifest["splits"].items():
            run.log_metrics({f"{split}_{kind}_hole_ratio": s["hole_ratio"]["mean"] for kind, s in kinds.items() if s["count"]})
        run.log_image(Path(args.out) / "masks.png", "masks.png")
    print(f"evaluation masks written to {args.out} (grid: {Path(args.out) / 'masks.png'})")


def _train(args, build_stage, train_cfg, steps: int, params: dict, sections: dict) -> None:
    """Build a stage from train.seed (its initial weights are part of the run) and run the one
    training loop on it; say where the result is."""
    from .train import seed_everything, train

    seed_everything(train_cfg.seed)
    stage = build_stage()
    metrics = train(stage, train_cfg, steps, args.run_dir, _tracking(params), sections, device=args.device,
                    restart_on_change=args.restart_on_change)
    print(f"{stage.name} trained for {metrics['step']} steps in {args.run_dir}: " +
          ", ".join(f"{k} {v:.4g}" for k, v in metrics["eval"].items()))


def cmd_train_vqgan(args) -> None:
    from .data.ingest import read_manifest
    from .stages.vqgan import VQGANStage

    params = _params(args)
    cfg, train_cfg, weights = (section(params, name) for name in ("vqgan", "train", "weights"))
    size = read_manifest(Path(args.shards))["params"]["size"]
    if cfg.pretrained:
        _import_vqgan(cfg.pretrained, cfg, size, args.run_dir, args.trust_pickle)
        return
    sections = {"vqgan": to_dict(cfg), "train": to_dict(train_cfg), "weights": to_dict(weights)}
    _train(args, lambda: VQGANStage(cfg, train_cfg, weights, Path(args.shards), size), train_cfg, cfg.steps, params,
           sections)


def _import_vqgan(checkpoint: str, cfg, size: int, run_dir: str, trust_pickle: bool) -> None:
    from .train import export_final
    from .vqgan import import_taming_checkpoint

    model = import_taming_checkpoint(checkpoint, cfg, size, trust_pickle=trust_pickle)
    config = {"vqgan": to_dict(cfg), "resolution": size}
    final = export_final(run_dir, "vqgan", config, {"vqgan": model}, source=str(checkpoint))
    print(f"imported {checkpoint} into {final}: tokenize with `latent-inpaint tokenize --vqgan {final}`")


def cmd_import_vqgan(args) -> None:
    """A taming-transformers VQGAN as this project's stage-0 output; the architecture comes from
    the vqgan section (the paper overlay matches taming's f16 ImageNet/OpenImages models)."""
    params = _params(args)
    size = args.size or section(params, "data").size
    _import_vqgan(args.checkpoint, section(params, "vqgan"), size, args.run_dir, args.trust_pickle)


def _device(name: str | None):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def cmd_tokenize(args) -> None:
    from .stages.tokens import tokenize
    from .stages.vqgan import load_trained_vqgan
    from .tracking import stage_run

    device = _device(args.device)
    model = load_trained_vqgan(Path(args.vqgan), device)
    with stage_run("tokens", _tracking(_params(args)), {}) as run:
        metrics = tokenize(model, Path(args.shards), Path(args.out), args.batch_size, device)
        usage = metrics["codebook"]
        run.log_metrics({"perplexity": usage["perplexity"], "codes_used": usage["codes_used"],
                         "dead_codes": usage["dead_codes"],
                         **{f"{s}_images_per_s": m["images_per_s"] for s, m in metrics["splits"].items()}})
        run.log_dict(metrics, "metrics")
    print(f"tokens of {sum(m['images'] for m in metrics['splits'].values())} images written to {args.out}; "
          f"codebook: {usage['codes_used']} of {usage['n_embed']} codes used, perplexity {usage['perplexity']:.1f}")


def cmd_train_encoder(args) -> None:
    from .data.ingest import read_manifest
    from .stages.encoder import EncoderStage
    from .stages.vqgan import saved_vqgan_config

    params = _params(args)
    cfg, masks, train_cfg = (section(params, name) for name in ("encoder", "masks", "train"))
    vq = saved_vqgan_config(Path(args.vqgan))
    size = read_manifest(Path(args.shards))["params"]["size"]
    sections = {"encoder": to_dict(cfg), "masks": to_dict(masks), "train": to_dict(train_cfg)}
    _train(args, lambda: EncoderStage(args.kind, vq, cfg, masks, train_cfg, Path(args.shards), Path(args.tokens), size),
           train_cfg, cfg.steps, params, sections)


def cmd_train_transformer(args) -> None:
    from .stages.transformer import TransformerStage
    from .stages.vqgan import load_trained_vqgan

    params = _params(args)
    cfg, train_cfg = section(params, "transformer"), section(params, "train")
    codebook = load_trained_vqgan(Path(args.vqgan), "cpu").quantize.embedding.weight.detach()
    sections = {"transformer": to_dict(cfg), "train": to_dict(train_cfg)}
    _train(args, lambda: TransformerStage(cfg, train_cfg, codebook, Path(args.tokens)), train_cfg, cfg.steps, params,
           sections)


def cmd_train_decoder(args) -> None:
    from .data.ingest import read_manifest
    from .stages.decoder import DecoderStage
    from .stages.vqgan import load_trained_vqgan

    params = _params(args)
    cfg, masks, train_cfg, weights, enc = (
        section(params, name) for name in ("decoder", "masks", "train", "weights", "encoder"))
    vqgan = load_trained_vqgan(Path(args.vqgan), "cpu")
    size = read_manifest(Path(args.shards))["params"]["size"]
    sections = {"decoder": to_dict(cfg), "masks": to_dict(masks), "train": to_dict(train_cfg),
                "weights": to_dict(weights), "encoder": to_dict(enc)}
    _train(args, lambda: DecoderStage(vqgan.cfg, cfg, masks, train_cfg, weights, Path(args.shards), Path(args.tokens),
                                      size, vqgan, alpha=enc.alpha), train_cfg, cfg.steps, params, sections)


def cmd_figure_alpha(args) -> None:
    """The paper's Figure 3: one mask and its token masks for several alpha."""
    from .masks import eval_mask, load_mask
    from .pictures import token_mask_figure

    params = _params(args)
    if args.mask:
        mask = load_mask(args.mask, hole_is_white=not args.white_is_visible)
    else:
        mask = eval_mask(args.kind, args.size or section(params, "data").size, section(params, "masks"), "val", args.index)
    factor = args.factor or 2 ** (len(section(params, "vqgan").channel_mult) - 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    token_mask_figure(mask, alphas=tuple(args.alphas), factor=factor).save(args.out)
    print(f"wrote {args.out}")


def _inputs(path: Path) -> list[Path]:
    from .data.images import IMAGE_EXTENSIONS

    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"input {path} does not exist")


def _mask_for(image_path: Path, shape: tuple[int, int], args, index: int, masks_cfg):
    """The mask of one image: a generated one (--mask box|small|large), the file given, or the
    file of the same stem in the mask folder. 1 = visible."""
    import numpy as np

    from .masks import box_mask, free_form_mask, load_mask

    if args.mask in ("box", "small", "large"):
        side = max(shape)
        if args.mask == "box":
            square = box_mask(side, masks_cfg.box_fraction)
        else:
            rng = np.random.default_rng([args.seed, index])
            square = free_form_mask(side, getattr(masks_cfg, args.mask), rng)
        top, left = (side - shape[0]) // 2, (side - shape[1]) // 2
        return square[top : top + shape[0], left : left + shape[1]]
    mask_path = Path(args.mask)
    if mask_path.is_dir():
        found = [p for p in mask_path.iterdir() if p.stem == image_path.stem]
        if not found:
            raise ValueError(f"no mask named {image_path.stem}.* in {mask_path} for {image_path}")
        mask_path = found[0]
    return load_mask(mask_path, hole_is_white=not args.mask_white_is_visible, size=shape)


def cmd_inpaint(args) -> None:
    """Inpaint an image or every image of a folder; one failure does not stop the others."""
    import warnings

    import numpy as np

    from .config import SampleConfig
    from .pictures import grid
    from .pipeline import Inpainter, load_image, save_png

    params = _params(args)
    sample_cfg = section(params, "sample")
    cfg = SampleConfig(
        steps=args.steps or sample_cfg.steps,
        temperature=sample_cfg.temperature if args.temperature is None else args.temperature,
        anneal=sample_cfg.anneal if args.anneal is None else args.anneal,
        samples=args.samples or sample_cfg.samples,
        seed=sample_cfg.seed if args.seed is None else args.seed,
    )
    args.seed = cfg.seed
    masks_cfg = section(params, "masks")
    model = Inpainter.from_runs(Path(args.runs), _device(args.device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"settings": {**to_dict(cfg), "mask": args.mask, "mask_convention":
                           "white = visible" if args.mask_white_is_visible else "white = hole",
                           "runs": str(args.runs), "size_policy": f"resized to {model.size}x{model.size} for the "
                           "model; hole pixels pasted back at full resolution"}, "images": {}}
    failed = 0
    for index, path in enumerate(_inputs(Path(args.input))):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                image = load_image(path)
                mask = _mask_for(path, image.shape[:2], args, index, masks_cfg)
            notes = [str(w.message) for w in caught]
            if not mask.any():
                notes.append("the mask has no visible pixel: the samples are unconditional")
            results = model.inpaint(image, mask, cfg, cfg.samples, cfg.seed)
            folder = out / path.stem
            folder.mkdir(exist_ok=True)
            for i, result in enumerate(results):
                save_png(result, folder / f"sample_{i:02d}.png")
            masked = np.where(mask[..., None].astype(bool), image, np.uint8(128))
            grid([image, masked, *results], cols=2 + len(results)).save(folder / "grid.png")
            status = "unchanged: the mask has no hole" if mask.all() else f"{len(results)} samples"
            report["images"][str(path)] = {"status": status, "notes": notes, "hole_ratio": float(1 - mask.mean())}
            print(f"{path}: {status} -> {folder}" + "".join(f"\n  note: {n}" for n in notes))
        except (ValueError, OSError) as exc:
            failed += 1
            report["images"][str(path)] = {"status": "failed", "error": str(exc)}
            print(f"{path}: failed: {exc}", file=sys.stderr)
    (out / "settings.json").write_text(json.dumps(report, indent=1))
    if failed:
        raise RuntimeError(f"{failed} of {len(report['images'])} images failed (see {out / 'settings.json'})")


ABLATION_HELP = ("full | t<temperature> (e.g. t0.5) | alpha<value> (e.g. alpha0.25) | vanilla_encoder | "
                 "miracle_encoder | vanilla_decoder | biharmonic (the classical reference alone)")


def _variant(name: str, sample_cfg) -> tuple[dict, object]:
    """An ablation's name -> (Inpainter.from_runs options, sampling settings)."""
    import dataclasses

    fixed = {"full": {}, "vanilla_encoder": {"encoder": "encoder_vanilla"}, "miracle_encoder": {"encoder": "miracle"},
             "vanilla_decoder": {"decoder": "vanilla"}}
    try:
        if name in fixed:
            return fixed[name], sample_cfg
        if name.startswith("alpha"):
            return {"alpha": float(name[5:])}, sample_cfg
        if name.startswith("t"):
            return {}, dataclasses.replace(sample_cfg, temperature=float(name[1:]))
    except ValueError:
        pass
    raise ConfigError(f"unknown ablation {name!r}: use {ABLATION_HELP}")


def cmd_evaluate(args) -> None:
    from .evaluate.report import table_markdown, write_metrics_json
    from .masks import KINDS
    from .pipeline import Inpainter
    from .stages.evaluate import biharmonic, evaluate_methods, ours, table_rows
    from .tracking import stage_run

    params = _params(args)
    cfg, sample_cfg, weights = (section(params, name) for name in ("evaluate", "sample", "weights"))
    device = _device(args.device)
    if args.variant == "biharmonic":
        methods = {}
    else:
        options, sample_cfg = _variant(args.variant, sample_cfg)
        methods = {"ours" if args.variant == "full" else args.variant:
                   ours(Inpainter.from_runs(Path(args.runs), device, **options), sample_cfg)}
    if args.baseline or args.variant == "biharmonic":
        methods["biharmonic (classical)"] = biharmonic
    kinds = tuple(args.kinds) if args.kinds else KINDS
    # The run's params are the pipeline's; a variant's own setting is in its stage name.
    logged = {"sample": to_dict(section(params, "sample")), "evaluate": to_dict(cfg)}
    with stage_run(f"evaluate_{args.variant.replace('.', '_')}", _tracking(params), logged) as run:
        results = evaluate_methods(methods, Path(args.shards), Path(args.masks), cfg, weights, str(device),
                                   kinds=kinds, with_diversity=not args.no_diversity)
        results["variant"] = args.variant
        write_metrics_json(args.out, results)
        for method, r in results.items():
            if isinstance(r, dict):
                name = re.sub(r"[^\w\-. ]", "", method).strip()  # MLflow's allowed metric characters
                run.log_metrics({f"{name}/{k}/{m}": v for k, ms in r.items() if isinstance(ms, dict)
                                 for m, v in ms.items()})
        if args.table:
            rows, columns = table_rows(results)
            text = table_markdown(rows, columns, f"Inpainting on the test split ({results['images']['fid']} images)",
                                  stand_in=results["stand_in"])
            Path(args.table).write_text(text)
            print(text)
    print(f"metrics written to {args.out}")


def cmd_report(args) -> None:
    from .stages.report import write_report

    params = _params(args)
    path = write_report(Path(args.results), Path(args.runs), Path(args.shards), Path(args.masks),
                        section(params, "sample"), _device(args.device), ablations=args.ablations)
    print(f"report written to {path}")


def cmd_mlflow_ui(args) -> None:
    from .tracking import UI_ENV, ui_command

    argv = ui_command(_tracking(_params(args)), Path.cwd(), port=args.port)
    print("starting:", " ".join(argv), flush=True)
    os.execve(argv[0], argv, {**os.environ, **UI_ENV})


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", action="append", metavar="FILE",
                        help="parameter file; repeat to overlay (default: ./params.yaml)")
    common.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one parameter, e.g. --set data.size=128")
    common.add_argument("--config-json", metavar="JSON", help="whole sections as JSON (used by Snakemake rules)")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    training = argparse.ArgumentParser(add_help=False)  # what every train-* command shares
    training.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the local GPU if any)")
    training.add_argument("--restart-on-change", action="store_true",
                          help="if the run folder holds a run of other parameters, move it to <run-dir>/previous/ "
                               "and train afresh (default: refuse, naming the differences)")
    training.add_argument("--processes", type=int, default=1, metavar="N",
                          help="train with N processes: the command starts itself under torchrun (one per GPU on "
                               "a GPU node, gloo processes on CPU); default 1")

    parser = argparse.ArgumentParser(prog="latent-inpaint", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("default-data", parents=[common], help="build the embedded default dataset")
    p.add_argument("--out", type=Path, default=Path("data/default"))
    p.add_argument("--count", type=int, help="images (default: data.default_count)")
    p.add_argument("--size", type=int, help="shorter side in pixels (default: data.size)")
    p.add_argument("--seed", type=int, help="crop seed (default: data.default_seed)")
    p.set_defaults(func=cmd_default_data)

    p = sub.add_parser("prepare", parents=[common], help="images -> train/val/test WebDataset shards")
    p.add_argument("--source", help="image folder (default: data.source)")
    p.add_argument("--out", default="data/shards")
    p.add_argument("--default-dir", default="data/default", help="where the embedded default dataset lives")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("masks", parents=[common], help="fixed evaluation mask sets and masks.png")
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--out", default="data/masks")
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser("train-vqgan", parents=[common, training], help="stage 0: train the VQGAN (or import vqgan.pretrained)")
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--run-dir", default="runs/vqgan")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pickled (Lightning) .ckpt when importing vqgan.pretrained: only for files you trust")
    p.set_defaults(func=cmd_train_vqgan)

    p = sub.add_parser("import-vqgan", parents=[common],
                       help="load a taming-transformers VQGAN checkpoint strictly and write it as runs/vqgan/final")
    p.add_argument("checkpoint", help="taming .ckpt (with a state_dict) or .safetensors")
    p.add_argument("--run-dir", default="runs/vqgan")
    p.add_argument("--size", type=int, help="image size the model serves (default: data.size)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pickled (Lightning) .ckpt: only for files you trust")
    p.set_defaults(func=cmd_import_vqgan)

    p = sub.add_parser("tokenize", parents=[common], help="VQGAN tokens of every split, and codebook usage")
    p.add_argument("--vqgan", default="runs/vqgan/final")
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--out", default="data/tokens")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("train-encoder", parents=[common, training], help="stage 1: the restrictive (or vanilla) encoder")
    p.add_argument("--kind", choices=["restrictive", "vanilla"], default="restrictive")
    p.add_argument("--vqgan", default="runs/vqgan/final")
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--tokens", default="data/tokens")
    p.add_argument("--run-dir", default="runs/encoder")
    p.set_defaults(func=cmd_train_encoder)

    p = sub.add_parser("train-transformer", parents=[common, training], help="stage 2: the bidirectional transformer")
    p.add_argument("--vqgan", default="runs/vqgan/final", help="its codebook feeds the transformer")
    p.add_argument("--tokens", default="data/tokens")
    p.add_argument("--run-dir", default="runs/transformer")
    p.set_defaults(func=cmd_train_transformer)

    p = sub.add_parser("train-decoder", parents=[common, training], help="stage 3: the decoder (E_prt + coupling + G)")
    p.add_argument("--vqgan", default="runs/vqgan/final")
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--tokens", default="data/tokens")
    p.add_argument("--run-dir", default="runs/decoder")
    p.set_defaults(func=cmd_train_decoder)

    p = sub.add_parser("figure-alpha", parents=[common], help="Figure 3: a mask and its token masks per alpha")
    p.add_argument("--mask", help="a mask file (default: a fixed evaluation mask)")
    p.add_argument("--white-is-visible", action="store_true", help="the mask file paints the visible part white")
    p.add_argument("--kind", choices=["small", "large", "box"], default="large")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--size", type=int)
    p.add_argument("--factor", type=int, help="image side / token grid side (default: the VQGAN's)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--out", default="results/figure3.png")
    p.set_defaults(func=cmd_figure_alpha)

    p = sub.add_parser("inpaint", parents=[common], help="inpaint an image or a folder with the trained model")
    p.add_argument("input", help="an image file or a folder of images")
    p.add_argument("--mask", default="box",
                   help="a mask file, a folder of masks named like the images, or box|small|large (default: box)")
    p.add_argument("--mask-white-is-visible", action="store_true",
                   help="mask files paint the visible part white (MAT, RePaint); default: white = hole")
    p.add_argument("--samples", type=int, help="samples per image (default: sample.samples)")
    p.add_argument("--temperature", type=float, help="t (default: sample.temperature)")
    p.add_argument("--anneal", type=float, help="s: step i samples at t * s**i (default: sample.anneal)")
    p.add_argument("--steps", type=int, help="k sampling steps (default: sample.steps)")
    p.add_argument("--seed", type=int, help="seed of the first sample (default: sample.seed)")
    p.add_argument("--runs", default="runs", help="folder holding vqgan/ encoder/ transformer/ decoder/")
    p.add_argument("--device")
    p.add_argument("--out", default="results/inpaint")
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("evaluate", parents=[common], help="FID, hole metrics and diversity on the test split")
    p.add_argument("--variant", default="full", help=ABLATION_HELP)
    p.add_argument("--runs", default="runs")
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--masks", default="data/masks")
    p.add_argument("--kinds", nargs="+", choices=["small", "large", "box"], help="mask types (default: all)")
    p.add_argument("--no-diversity", action="store_true", help="skip the LPIPS diversity (ablations)")
    p.add_argument("--baseline", action="store_true", help="also score the classical biharmonic reference")
    p.add_argument("--out", default="results/metrics.json")
    p.add_argument("--table", help="also write the Markdown table here")
    p.add_argument("--device")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", parents=[common], help="results/report.md: tables, sample grids, training curves")
    p.add_argument("--results", default="results")
    p.add_argument("--runs", default="runs")
    p.add_argument("--shards", default="data/shards")
    p.add_argument("--masks", default="data/masks")
    p.add_argument("--ablations", nargs="*", default=[], help="results/ablations/<name>.json files to tabulate")
    p.add_argument("--device")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("mlflow-ui", parents=[common], help="open the tracking store in the MLflow UI on 127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_mlflow_ui)
    return parser


def _torchrun(processes: int, argv: list[str]) -> list[str]:
    """This same command under torchrun with `processes` local workers. --standalone picks a free
    rendezvous port, so several such jobs can share a node; SIGTERM (SLURM preemption) reaches
    every worker, which checkpoints before it exits."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "latent_inpaint.cli", *argv]


def main(argv: list[str] | None = None) -> int:
    from .data.ingest import DataError

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    processes = getattr(args, "processes", 1)
    if processes < 1:
        print(f"latent-inpaint {args.command}: --processes must be at least 1, got {processes}", file=sys.stderr)
        return 2
    if processes > 1 and "WORLD_SIZE" not in os.environ:  # the workers themselves run under torchrun
        os.execv(sys.executable, _torchrun(processes, argv))
    try:
        args.func(args)
    except ConfigError as exc:
        print(f"latent-inpaint {args.command}: parameter error: {exc}", file=sys.stderr)
        return 2
    except (DataError, ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("LATENT_INPAINT_DEBUG"):
            raise
        print(f"latent-inpaint {args.command}: error: {exc}", file=sys.stderr)
        print("  (set LATENT_INPAINT_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"latent-inpaint {args.command}: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
