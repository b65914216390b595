"""The pipeline as data: what each rule reads, makes, and runs. Its one definition.

Snakemake's rules (workflow/rules/*.smk) take their inputs, outputs, params sections and code
digest from `STAGES`; `python workflow/dag.py > dvc.yaml` writes DVC's view of the same rules
(tests/test_workflow.py fails when dvc.yaml is not what this file makes).

The code a rule runs is the static import closure of its entry module in src/latent_inpaint:
every `import` and `from ... import` of the package, at module level or inside a function,
followed transitively (package `__init__.py` files included). The CLI is wiring that calls the
entry module and is in no closure. Snakemake sees the closure as a digest of its files' syntax
trees without docstrings (a rule param, so a change reruns the rule), so editing comments,
docstrings or formatting reruns nothing, while any change to what the code does reruns the rules
that run it. DVC hashes the files' bytes: after a comment-only edit `dvc status` lists the
stages whose files changed, and `dvc repro` calls Snakemake, which finds nothing to do.

    python workflow/dag.py [PARAMS.yaml]    # dvc.yaml for these params (default: params.yaml)
    python workflow/dag.py --code RULE      # the source files of RULE, one per line
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import sys
from pathlib import Path

from latent_inpaint import layout  # every path the pipeline writes, spelled once
from latent_inpaint.data.ingest import SPLITS  # every split gets its tokens, even an empty one
from latent_inpaint.layout import CURVES, PLOTS, final, run_dir

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "latent_inpaint"
SRC = Path("src") / PACKAGE  # relative to the project folder
LAUNCHER = "workflow/snakemake.sh"  # runs Snakemake with the project's interpreter


@dataclasses.dataclass(frozen=True)
class Stage:
    entry: str  # module under src/latent_inpaint whose import closure is the code the rule runs
    params: tuple[str, ...]  # params.yaml sections (or section.key) the rule reads: rerun triggers
    needs: tuple[str, ...]  # rules whose outputs it reads
    done: tuple[str, ...]  # what Snakemake tracks: the rule's output files
    outs: tuple[str, ...]  # what DVC versions: the folders and files the rule makes
    metrics: tuple[str, ...] = ()  # the metrics files it writes (`dvc metrics`), among its outs or in them
    curves: tuple[str, ...] = ()  # fields of every record of runs/<stage>/curves.json that `dvc plots` draws
    resources: str = "light"  # the params.yaml resources kind: train | infer | light
    made: tuple[str, ...] = ()  # more files it makes, read by no rule by name: outputs and readers' inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every file of fixed name the rule makes: deleting any one reruns it (and what follows).
        Files whose names depend on the data (shard tars, mask PNGs) stand behind a manifest."""
        return (*self.done, *self.made)


def _weights(stage: str, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{run_dir(stage)}/final/{name}.safetensors" for name in names)


def _trained(entry: str, params: tuple[str, ...], needs: tuple[str, ...], stage: str,
             weights: tuple[str, ...], curves: tuple[str, ...]) -> Stage:
    """final/config.json stands for the stage (written last); its weights files are outputs too.
    `curves`: the logged fields plotted against the step (present from the first logged step on)."""
    made = _weights(stage, weights)
    return Stage(entry, params, needs, (final(stage),), (run_dir(stage),), metrics=(f"{run_dir(stage)}/metrics.json",),
                 curves=curves, resources="train", made=made)


RESULTS = layout.RESULTS
ENCODER_CURVES = ("loss/encoder", "accuracy", "partial_accuracy")
MODEL = ("vqgan", "encoder", "transformer", "decoder")  # the parts inference loads
IMPORTED = (*MODEL, "refiner")  # the model folders `import-official` writes (stages/official.py STAGES)
IMPORT = "import_official"  # pretrained.official: this rule in place of TRAINING's (see `pipeline`)
TRAINING = ("vqgan", "tokens", "encoder", "encoder_vanilla", "transformer", "decoder")
TRAINING_CURVES = f"{layout.RESULTS}/curves.png"  # made by the report only when something was trained here
STAGES = {
    "default_data": Stage("data/default.py", ("data.default_count", "data.size", "data.default_seed"), (),
                          (layout.DEFAULT_DATA,), (layout.DEFAULT_DATA,)),
    "prepare": Stage("stages/prepare.py", ("data",), ("default_data",),
                     (f"{layout.SHARDS}/manifest.json",), (layout.SHARDS,)),
    "masks": Stage("stages/masks.py", ("masks",), ("prepare",),
                   (f"{layout.MASKS}/manifest.json", f"{layout.MASKS}/masks.png"), (layout.MASKS,)),
    # An imported VQGAN (vqgan.pretrained) has no discriminator: only vqgan.safetensors is sure.
    "vqgan": _trained("stages/vqgan.py", ("vqgan", "train", "weights"), ("prepare",), "vqgan", ("vqgan",),
                      ("loss/vqgan", "rec_loss", "codebook_loss")),
    "tokens": Stage("stages/tokens.py", (), ("prepare", "vqgan"), (f"{layout.TOKENS}/metrics.json",),
                    (layout.TOKENS,), metrics=(f"{layout.TOKENS}/metrics.json",), resources="infer",
                    made=tuple(f"{layout.TOKENS}/{split}.{ext}" for split in SPLITS for ext in ("npy", "keys.json"))),
    "encoder": _trained("stages/encoder.py", ("encoder", "masks", "train"), ("prepare", "tokens", "vqgan"),
                        "encoder", ("encoder",), ENCODER_CURVES),
    "encoder_vanilla": _trained("stages/encoder.py", ("encoder", "masks", "train"),
                                ("prepare", "tokens", "vqgan"), "encoder_vanilla", ("encoder",), ENCODER_CURVES),
    "transformer": _trained("stages/transformer.py", ("transformer", "train"), ("tokens", "vqgan"),
                            "transformer", ("transformer",), ("loss/transformer", "masked_accuracy")),
    "decoder": _trained("stages/decoder.py", ("decoder", "masks", "train", "weights", "encoder"),
                        ("prepare", "tokens", "vqgan"), "decoder", ("decoder", "disc"),
                        ("loss/decoder", "loss/disc", "hole_l1", "perceptual")),
    # The authors' released models; the specs it writes take the sections' settings.
    IMPORT: Stage("stages/official.py", ("pretrained", "vqgan", "encoder", "transformer"), (),
                  tuple(final(s) for s in IMPORTED), tuple(run_dir(s) for s in IMPORTED),  # no GPU needed
                  made=tuple(f for s in IMPORTED for f in _weights(s, (s,)))),
    "evaluate": Stage("stages/evaluate.py", ("sample", "evaluate", "weights"), ("prepare", "masks", *MODEL),
                      (f"{RESULTS}/metrics.json", f"{RESULTS}/table1.md"), (f"{RESULTS}/table1.md",),
                      metrics=(f"{RESULTS}/metrics.json",), resources="infer"),
    # One job scores every name in evaluate.ablations, a file each ({variant}): one process loads the
    # models and the real images' features once. vanilla_encoder also needs encoder_vanilla.
    "ablation": Stage("stages/evaluate.py", ("sample", "evaluate", "weights"), ("prepare", "masks", *MODEL),
                      (f"{RESULTS}/ablations/{{variant}}.json",), (),
                      metrics=(f"{RESULTS}/ablations/{{variant}}.json",),
                      resources="infer"),
    "report": Stage("stages/report.py", ("sample",), ("prepare", "masks", *MODEL, "evaluate", "ablation"),
                    (f"{RESULTS}/report.md", f"{RESULTS}/samples.png"),
                    (f"{RESULTS}/report.md", f"{RESULTS}/samples.png", TRAINING_CURVES, f"{RESULTS}/{PLOTS}"),
                    made=(TRAINING_CURVES, f"{RESULTS}/{PLOTS}/evaluation.json",
                          f"{RESULTS}/{PLOTS}/ablations.json")),
}
EXTRA_NEEDS = {"vanilla_encoder": "encoder_vanilla"}  # ablation variant -> the extra stage it needs


def skipped_ablations(config: dict) -> dict[str, str]:
    """evaluate.ablations this config cannot score, with the reason: with the authors' models
    imported, those that need a part trained here (the vanilla encoder: the release has none)."""
    if not config["pretrained"]["official"]:
        return {}
    return {v: f"needs the {EXTRA_NEEDS[v]} rule's model, trained here; the authors released none and "
               "pretrained.official trains nothing" for v in config["evaluate"]["ablations"] if v in EXTRA_NEEDS}


def ablations(config: dict) -> list[str]:
    """The evaluate.ablations this config scores."""
    return [v for v in config["evaluate"]["ablations"] if v not in skipped_ablations(config)]


def pipeline(config: dict) -> dict[str, Stage]:
    """The rules this config runs. With pretrained.official, import_official in place of the
    training rules, what read their models reads the import, and the report draws no training
    curves; encoder_vanilla only for its ablation; the ablation rule only for some ablation."""
    imported = bool(config["pretrained"]["official"])
    extra = tuple(dict.fromkeys(EXTRA_NEEDS[v] for v in ablations(config) if v in EXTRA_NEEDS))
    rules = {}
    for rule, stage in STAGES.items():
        if (rule == IMPORT and not imported) or (imported and rule in TRAINING):
            continue  # the import or the training, never both
        if (rule in EXTRA_NEEDS.values() and rule not in extra) or (rule == "ablation" and not ablations(config)):
            continue
        if rule == "ablation":
            stage = dataclasses.replace(stage, needs=(*stage.needs, *extra))
        if imported:
            needs = tuple(dict.fromkeys(IMPORT if need in TRAINING else need for need in stage.needs))
            files = {k: tuple(f for f in getattr(stage, k) if f != TRAINING_CURVES) for k in ("done", "outs", "made")}
            stage = dataclasses.replace(stage, needs=needs, **files)
        rules[rule] = stage
    return rules


def ablation_files(config: dict) -> list[str]:
    return [STAGES["ablation"].done[0].format(variant=v) for v in ablations(config)]


def targets(config: dict) -> list[str]:
    """Every file the pipeline makes, for `rule all`. Snakemake reruns a job for a missing output
    only when something asks for that file, so asking for all of them is what makes deleting any
    one rerun the rule that makes it (and, its outputs now newer, the rules downstream)."""
    files: list[str] = []
    for rule, stage in pipeline(config).items():
        if rule == "default_data" and config["data"]["source"] != "default":
            continue  # a data.source of the user's own
        files += ablation_files(config) if rule == "ablation" else stage.outputs
    return files


def inputs(rule: str, config: dict) -> dict[str, str | list[str]]:
    """The files a rule reads, named by the rule that makes them: its `done` files (a list where
    it has several; every ablation's, for the report), and its `made` files as `<rule>_files`;
    `source` is the data folder, the default dataset or a data.source of the user's own."""
    files: dict[str, str | list[str]] = {}
    # A rule this config does not run (encoder_vanilla without its ablation) keeps its own needs.
    for need in pipeline(config).get(rule, STAGES[rule]).needs:
        if need == "default_data":
            source = config["data"]["source"]
            files["source"] = STAGES[need].done[0] if source == "default" else source
        elif need == "ablation":
            files[need] = ablation_files(config)
        else:
            done = STAGES[need].done
            files[need] = done[0] if len(done) == 1 else list(done)
            if STAGES[need].made:
                # Snakemake reruns a job for a missing output only when a reader asks for it.
                files[f"{need}_files"] = list(STAGES[need].made)
    if rule == IMPORT:  # the user's files, like a data.source: Snakemake reads them, DVC does not hash them
        files["checkpoints"] = released_files(config)
    return files


def released_files(config: dict) -> list[str]:
    """The authors' files the import reads: pretrained.model's, in the pretrained.official folder."""
    from latent_inpaint.stages.official import SOURCES  # torch and the models: only for this rule

    folder = Path(config["pretrained"]["official"])
    return sorted({str(folder / name) for name, _ in SOURCES[config["pretrained"]["model"]].values()})


# ---------------------------------------------------------------------------------- the code


def _module_file(src: Path, module: str) -> Path | None:
    """src/latent_inpaint/a/b.py or .../a/b/__init__.py for `latent_inpaint.a.b`; None outside."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = src.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(src: Path, path: Path) -> set[Path]:
    """The package's files that `path` imports anywhere in its body, with the packages' __init__."""
    rel = path.relative_to(src).with_suffix("")
    package = [PACKAGE, *rel.parts[:-1]]  # what a relative import of level 1 names
    found: set[Path] = set()

    def add(module: str) -> None:
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
            file = _module_file(src, ".".join(parts[:i]))
            if file is not None:
                found.add(file)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            add(module)
            for alias in node.names:  # `from . import masks` names a module, not an attribute
                add(f"{module}.{alias.name}")
    return found


def code_files(rule: str, root: Path = ROOT) -> list[str]:
    """The source files a rule runs, relative to the project folder, sorted."""
    src = root / SRC
    todo, seen = [src / STAGES[rule].entry], set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += _imports(src, path)
    return sorted(str(p.relative_to(root)) for p in seen)


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


@functools.cache
def _tree_digest(path: Path, mtime_ns: int) -> str:
    tree = _without_docstrings(ast.parse(path.read_text(), str(path)))
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def code_digest(rule: str, root: Path = ROOT) -> str:
    """A digest of what the rule's code does: its files' names and syntax trees, not their
    comments, docstrings or layout."""
    h = hashlib.sha256()
    for name in code_files(rule, root):
        path = root / name
        h.update(f"{name}:{_tree_digest(path, path.stat().st_mtime_ns)}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------- dvc.yaml


def _dvc_stage(rule: str, target: str, needs: tuple[str, ...], config: dict, root: Path) -> dict:
    stage = STAGES[rule]
    deps = []
    for need in needs:
        if need == "default_data" and config["data"]["source"] != "default":
            continue  # a data.source of the user's own: Snakemake reads it, DVC does not hash it
        deps += [*STAGES[need].outs, *_own_metrics(need, config)]
    own = _own_metrics(rule, config)
    return {
        "cmd": f"sh {LAUNCHER} --cores all {target}",
        "deps": [*deps, *code_files(rule, root)],
        **({"params": list(stage.params)} if stage.params else {}),
        **({"outs": [{o: {"persist": True}} for o in stage.outs]} if stage.outs else {}),
        **({"metrics": [{m: {"persist": True}} for m in own]} if own else {}),
    }


def _inside(path: str, folders: tuple[str, ...]) -> bool:
    return any(path.startswith(f"{folder}/") for folder in folders)


def _own_metrics(rule: str, config: dict) -> list[str]:
    """The rule's metrics files that are outputs of their own (not inside one of its folders);
    the ablation's, one per variant this config scores."""
    if rule == "ablation":
        return ablation_files(config)
    return [m for m in STAGES[rule].metrics if not _inside(m, STAGES[rule].outs)]


def _plots(rules: list[str]) -> list[dict]:
    """`dvc plots`: each training run's curves against the step; the evaluation's and the
    ablations' numbers as bars (the report stage writes them as records)."""
    plots: list[dict] = [{f"{run_dir(r)}/{CURVES}": {"x": "step", "y": list(STAGES[r].curves),
                                                     "title": f"{r} training"}} for r in rules if STAGES[r].curves]
    records = f"{RESULTS}/{PLOTS}"
    for field, title in (("fid", "FID (lower is better)"), ("hole_psnr", "PSNR in the hole, dB")):
        plots.append({f"evaluation {field}": {"template": "bar_horizontal", "x": field,
                                              "y": {f"{records}/evaluation.json": "result"}, "title": title}})
        plots.append({f"ablations {field}": {"template": "bar_horizontal", "x": field,
                                             "y": {f"{records}/ablations.json": "variant"},
                                             "title": f"ablations (box mask): {title}"}})
    return plots


def dvc_yaml(config: dict, root: Path = ROOT) -> str:
    """dvc.yaml for these params: one DVC stage per Snakemake job, whose cmd is that job's
    Snakemake target, deps the outputs it reads and the code it runs, params its sections, and
    outs persistent so that Snakemake's own incremental logic decides what is recomputed.
    Top-level `metrics:` name the metrics files inside output folders (runs/*/metrics.json,
    data/tokens/metrics.json), so that `dvc metrics diff` compares every one; `plots:` the
    training curves and the evaluation."""
    import yaml

    stages, rules = {}, []
    for rule, stage in pipeline(config).items():  # the rules of Snakemake's DAG
        rules.append(rule)
        target = " ".join(ablation_files(config)) if rule == "ablation" else stage.done[0]
        stages[rule] = _dvc_stage(rule, target, stage.needs, config, root)
    inside = [m for r in rules for m in STAGES[r].metrics if _inside(m, STAGES[r].outs)]
    head = ("# Generated by `python workflow/dag.py > dvc.yaml` from workflow/dag.py and params.yaml: do not\n"
            "# edit. DVC versions what the Snakemake rules make; each stage's cmd is the Snakemake target of\n"
            f"# its rule, run by {LAUNCHER} (the project's .venv without activating it), so `dvc repro`\n"
            "# runs the same rules (see README, Artifacts with DVC).\n")
    return head + yaml.safe_dump({"stages": stages, "metrics": inside, "plots": _plots(rules)}, sort_keys=False,
                                 width=120)


def load_config(params: Path) -> dict:
    import yaml

    return yaml.safe_load(params.read_text())


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--code"]:
        print("\n".join(code_files(args[1])))
    else:
        sys.stdout.write(dvc_yaml(load_config(Path(args[0]) if args else ROOT / "params.yaml")))
