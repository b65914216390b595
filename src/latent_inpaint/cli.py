"""`latent-inpaint`: one command, a subcommand per pipeline stage.

Every stage reads its hyperparameters from `params.yaml` (plus `--params` overlays and
`--set section.key=value`); Snakemake rules pass the sections they depend on as `--config-json`.
Outside a project folder the package's own defaults serve, so commands that read trained runs
work anywhere. Each command parses its options, calls one library function and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__, layout, usage
from .config import ABLATIONS, OFFICIAL_MODELS, ConfigError, section, validate
from .masks import KINDS
from .params import PACKAGED_PARAMS, default_params_file, load_params
from .usage import UsageError, at_least, fraction, positive_float

# Commands whose outputs do not depend on which defaults served: no note about the package's.
READ_ONLY = ("inpaint", "figure-alpha")
SAMPLE_OPTIONS = ("steps", "temperature", "anneal", "samples", "seed")  # inpaint's options over `sample`


def _params(args) -> dict:
    if not args.params and args.command not in READ_ONLY and default_params_file() == PACKAGED_PARAMS:
        print(f"note: no params.yaml in {Path.cwd()}: using the package's defaults ({PACKAGED_PARAMS})",
              file=sys.stderr)
    params = load_params(args.params, args.set, args.config_json)
    validate(params, together=not args.config_json)  # all of it, whichever sections this command reads
    return params


def cmd_default_data(args) -> str:
    from .data.default import build_default_dataset

    # Explicit flags (defaults from params) let the rule depend on these three keys alone.
    flags = {"default_count": args.count, "size": args.size, "default_seed": args.seed}
    cfg = section(_params(args), "data") if None in flags.values() else None
    count, size, seed = (getattr(cfg, key) if value is None else value for key, value in flags.items())
    return f"wrote {len(build_default_dataset(args.out, count, size, seed))} images to {args.out}"


def cmd_prepare(args) -> str:
    from .stages import prepare

    return prepare.run(_params(args), args.source, args.out, args.default_dir, progress=not args.quiet)


def cmd_masks(args) -> str:
    from .stages import masks

    return masks.run(_params(args), args.shards, args.out)


def _training(args) -> dict:  # what every train-* command passes on
    return {"device": args.device, "restart_on_change": args.restart_on_change}


def cmd_train_vqgan(args) -> str:
    from .stages import vqgan

    return vqgan.run(_params(args), args.shards, args.run_dir, trust_pickle=args.trust_pickle, **_training(args))


def cmd_import_vqgan(args) -> str:
    from .stages import vqgan

    return vqgan.import_vqgan(args.checkpoint, _params(args), args.run_dir, size=args.size,
                              trust_pickle=args.trust_pickle)


def cmd_import_official(args) -> str:
    from .stages import official

    return official.import_official(args.checkpoints, args.model, args.runs, _params(args),
                                    trust_pickle=args.trust_pickle)


def cmd_tokenize(args) -> str:
    from .stages import tokens

    return tokens.run(_params(args), args.vqgan, args.shards, args.out, batch_size=args.batch_size, device=args.device)


def cmd_train_encoder(args) -> str:
    from .stages import encoder

    return encoder.run(_params(args), args.vqgan, args.shards, args.tokens, args.run_dir, kind=args.kind,
                       **_training(args))


def cmd_train_transformer(args) -> str:
    from .stages import transformer

    return transformer.run(_params(args), args.vqgan, args.tokens, args.run_dir, **_training(args))


def cmd_train_decoder(args) -> str:
    from .stages import decoder

    return decoder.run(_params(args), args.vqgan, args.shards, args.tokens, args.run_dir, **_training(args))


def cmd_figure_alpha(args) -> str:
    from .stages.report import alpha_figure

    return alpha_figure(_params(args), args.out, mask_file=args.mask, white_is_visible=args.white_is_visible,
                        kind=args.kind, index=args.index, size=args.size, factor=args.factor, alphas=args.alphas)


def cmd_inpaint(args) -> None:
    from .stages.inpaint import run

    params = _params(args)
    cfg = usage.sample_config(section(params, "sample"), **{k: vars(args)[k] for k in SAMPLE_OPTIONS})
    run(params, cfg, args.input, args.out, args.runs, mask=args.mask, device=args.device,
        mask_white_is_visible=args.mask_white_is_visible)


def cmd_evaluate(args) -> str:
    from .stages import evaluate

    return evaluate.run(_params(args), args.variant, args.runs, args.shards, args.masks, args.out, table=args.table,
                        kinds=tuple(args.kinds), diversity=not args.no_diversity, baseline=args.baseline,
                        device=args.device)


def cmd_ablations(args) -> str:
    from .stages import evaluate

    return evaluate.run_ablations(_params(args), args.variants, args.runs, args.shards, args.masks, args.out,
                                  device=args.device)


def cmd_report(args) -> str:
    from .stages import report

    return report.run(_params(args), args.results, args.runs, args.shards, args.masks, ablations=args.ablations,
                      skipped=args.skipped_ablations, device=args.device)


def cmd_mlflow_ui(args) -> None:
    from .mlflow_store import UI_ENV, ui_command, ui_url
    from .tracking import tracking_config

    cfg = tracking_config(_params(args))
    url = ui_url(cfg, Path.cwd(), args.port, elsewhere=[Path(f).resolve().parent for f in args.params or ()])
    argv = ui_command(cfg, Path.cwd(), port=args.port)
    print("starting:", " ".join(argv), flush=True)
    print(f"open {url} (the runs, in MLflow's Model training view)", flush=True)
    os.execve(argv[0], argv, {**os.environ, **UI_ENV})


def _folders(p: argparse.ArgumentParser, *names: str, **defaults: str) -> None:
    """--<name> options for the usual project folders, and for others with the defaults given."""
    for name, default in [*((n, usage.FOLDERS[n]) for n in names), *defaults.items()]:
        p.add_argument(f"--{name.replace('_', '-')}", type=Path, default=Path(default), help=usage.FOLDER_HELP[name])


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", action="append", metavar="FILE",
                        help="parameter file; repeat to overlay (default: ./params.yaml, else the package's defaults)")
    common.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one parameter, e.g. --set data.size=128; repeatable (default: none)")
    common.add_argument("--config-json", metavar="JSON", help="sections as JSON, for Snakemake rules (default: none)")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the local GPU if any)")
    training = argparse.ArgumentParser(add_help=False, parents=[device])  # what every train-* command shares
    training.add_argument("--restart-on-change", action="store_true",
                          help="if the run folder holds a run of other parameters, move it to <run-dir>/previous/ "
                               "and train afresh (default: refuse, naming the differences)")
    training.add_argument("--processes", type=at_least(1), default=1, metavar="N",
                          help="train with N processes: the command starts itself under torchrun (one per GPU on "
                               "a GPU node, gloo processes on CPU)")

    parser = argparse.ArgumentParser(prog="latent-inpaint", description=__doc__.splitlines()[0],
                                     formatter_class=usage.HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common, *parents], help=help, formatter_class=usage.HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("default-data", cmd_default_data, "build the embedded default dataset")
    _folders(p, out=layout.DEFAULT_DATA)
    p.add_argument("--count", type=at_least(1), help="images (default: data.default_count)")
    p.add_argument("--size", type=at_least(1), help="shorter side in pixels (default: data.size)")
    p.add_argument("--seed", type=at_least(0), help="crop seed (default: data.default_seed)")

    p = command("prepare", cmd_prepare, "images -> train/val/test WebDataset shards")
    p.add_argument("--source", help="image folder (default: data.source)")
    _folders(p, out=layout.SHARDS, default_dir=layout.DEFAULT_DATA)

    p = command("masks", cmd_masks, "fixed evaluation mask sets and masks.png")
    _folders(p, "shards", out=layout.MASKS)

    pickled = argparse.ArgumentParser(add_help=False)  # the commands that may import a taming checkpoint
    pickled.add_argument("--trust-pickle", action="store_true", help="allow a pickled (Lightning) .ckpt to be "
                         "imported (also as vqgan.pretrained): only for files you trust")
    p = command("train-vqgan", cmd_train_vqgan, "stage 0: train the VQGAN (or import vqgan.pretrained)", training,
                pickled)
    _folders(p, "shards", run_dir=layout.run_dir("vqgan"))

    p = command("import-vqgan", cmd_import_vqgan,
                "load a taming-transformers VQGAN checkpoint strictly and write it as runs/vqgan/final", pickled)
    p.add_argument("checkpoint", type=Path, help="taming .ckpt (with a state_dict) or .safetensors")
    _folders(p, run_dir=layout.run_dir("vqgan"))
    p.add_argument("--size", type=at_least(1), help="image size the model serves (default: data.size)")

    p = command("import-official", cmd_import_official, "the authors' released .ckpt files -> runs/*/final", pickled)
    p.add_argument("checkpoints", type=Path, help="folder holding their released .ckpt files")
    p.add_argument("--model", required=True, choices=OFFICIAL_MODELS, help="released model")
    _folders(p, "runs")

    p = command("tokenize", cmd_tokenize, "VQGAN tokens of every split, and codebook usage", device)
    _folders(p, "vqgan", "shards", out=layout.TOKENS)
    p.add_argument("--batch-size", type=at_least(1), default=32, help="images per forward pass")

    p = command("train-encoder", cmd_train_encoder, "stage 1: the restrictive (or vanilla) encoder", training)
    p.add_argument("--kind", choices=["restrictive", "vanilla"], default="restrictive", help="vanilla: the ablation's")
    _folders(p, "vqgan", "shards", "tokens", run_dir=layout.run_dir("encoder"))

    p = command("train-transformer", cmd_train_transformer, "stage 2: the bidirectional transformer "
                "(the VQGAN's codebook feeds it)", training)
    _folders(p, "vqgan", "tokens", run_dir=layout.run_dir("transformer"))

    p = command("train-decoder", cmd_train_decoder, "stage 3: the decoder (E_prt + coupling + G)", training)
    _folders(p, "vqgan", "shards", "tokens", run_dir=layout.run_dir("decoder"))

    p = command("figure-alpha", cmd_figure_alpha, "Figure 3: a mask and its token masks per alpha")
    p.add_argument("--mask", help="a mask file (default: a fixed evaluation mask)")
    p.add_argument("--white-is-visible", action="store_true", help="the mask file paints the visible part white")
    p.add_argument("--kind", choices=KINDS, default="large", help="evaluation mask kind")
    p.add_argument("--index", type=at_least(0), default=0, help="which evaluation mask of that kind (val split)")
    p.add_argument("--size", type=at_least(1), help="image side in pixels (default: data.size)")
    p.add_argument("--factor", type=at_least(1), help="image side / token grid side (default: the VQGAN's)")
    p.add_argument("--alphas", type=fraction, nargs="+", default=[0.25, 0.5, 0.75, 1.0], help="token-mask thresholds")
    _folders(p, out=f"{layout.RESULTS}/figure3.png")

    p = command("inpaint", cmd_inpaint, "inpaint an image or a folder with the trained model", device)
    p.add_argument("input", type=Path, help="an image file or a folder of images")
    p.add_argument("--mask", default="box",
                   help="a mask file, a folder of masks named like the images, or box|small|large (default: box)")
    p.add_argument("--mask-white-is-visible", action="store_true",
                   help="mask files paint the visible part white (MAT, RePaint); default: white = hole")
    p.add_argument("--samples", type=at_least(1), help="samples per image (default: sample.samples)")
    p.add_argument("--temperature", type=positive_float, help="t (default: sample.temperature)")
    p.add_argument("--anneal", type=positive_float, help="s: step i samples at t * s**i (default: sample.anneal)")
    p.add_argument("--steps", type=at_least(1), help="k sampling steps (default: sample.steps)")
    p.add_argument("--seed", type=usage.seed, help="seed of the first sample; sample i uses seed + i "
                   "(default: sample.seed)")
    _folders(p, "runs", out=f"{layout.RESULTS}/inpaint")

    p = command("evaluate", cmd_evaluate, "FID, hole metrics and diversity on the test split", device)
    p.add_argument("--variant", default="full", help=f"what to score: {ABLATIONS}")
    _folders(p, "runs", "shards", "masks", out=f"{layout.RESULTS}/metrics.json")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="mask types (default: all)")
    p.add_argument("--no-diversity", action="store_true", help="skip the LPIPS diversity")
    p.add_argument("--baseline", action="store_true", help="also score the classical biharmonic reference")
    p.add_argument("--table", type=Path, help="also write the Markdown table here (default: none)")

    p = command("ablations", cmd_ablations, "the ablations' FID and hole metrics (box mask) in one process", device)
    p.add_argument("--variants", nargs="+", help=f"what to score: {ABLATIONS} (default: evaluate.ablations)")
    _folders(p, "runs", "shards", "masks", out=f"{layout.RESULTS}/ablations")

    p = command("report", cmd_report, "results/report.md: tables, sample grids, training curves", device)
    _folders(p, "runs", "shards", "masks", results=layout.RESULTS)
    p.add_argument("--ablations", nargs="*", default=[], help="results/ablations/*.json to tabulate (default: none)")
    p.add_argument("--skipped-ablations", type=json.loads, default={}, metavar="JSON",
                   help="ablations left out, {name: reason}, said in the report (default: none)")

    p = command("mlflow-ui", cmd_mlflow_ui, "open the tracking store in the MLflow UI on 127.0.0.1")
    p.add_argument("--port", type=usage.port, default=5000, help="port of the UI on 127.0.0.1")
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
    try:
        if getattr(args, "device", None) is not None:
            usage.device(args.device)
        if getattr(args, "processes", 1) > 1 and "WORLD_SIZE" not in os.environ:  # workers run under torchrun
            os.execv(sys.executable, _torchrun(args.processes, argv))
        summary = args.func(args)
    except (ConfigError, UsageError) as exc:  # one exit code for every usage or parameter error
        kind = "parameter error" if isinstance(exc, ConfigError) else "error"
        print(f"latent-inpaint {args.command}: {kind}: {exc}", file=sys.stderr)
        return 2
    except (DataError, ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("LATENT_INPAINT_DEBUG"):
            raise
        print(f"latent-inpaint {args.command}: error: {exc}", file=sys.stderr)
        print("  (set LATENT_INPAINT_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        said = str(exc) or "finished work is kept, rerun to resume"
        print(f"latent-inpaint {args.command}: stopped by signal {getattr(exc, 'signum', 2)}; {said}", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
    if summary:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
