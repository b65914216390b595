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
from latent_inpaint.layout import final, run_dir

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "latent_inpaint"
SRC = Path("src") / PACKAGE  # relative to the project folder


@dataclasses.dataclass(frozen=True)
class Stage:
    entry: str  # module under src/latent_inpaint whose import closure is the code the rule runs
    params: tuple[str, ...]  # params.yaml sections (or section.key) the rule reads: rerun triggers
    needs: tuple[str, ...]  # rules whose outputs it reads
    done: tuple[str, ...]  # what Snakemake tracks: the rule's output files
    outs: tuple[str, ...]  # what DVC versions: the folders and files the rule makes
    metrics: tuple[str, ...] = ()  # DVC metrics files among them
    resources: str = "light"  # the params.yaml resources kind: train | infer | light
    made: tuple[str, ...] = ()  # more files it makes, read by no rule by name: outputs and readers' inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every file of fixed name the rule makes: deleting any one reruns it (and what follows).
        Files whose names depend on the data (shard tars, mask PNGs) stand behind a manifest."""
        return (*self.done, *self.made)


def _trained(entry: str, params: tuple[str, ...], needs: tuple[str, ...], stage: str,
             weights: tuple[str, ...]) -> Stage:
    """final/config.json stands for the stage (written last); its weights files are outputs too."""
    made = tuple(f"{run_dir(stage)}/final/{name}.safetensors" for name in weights)
    return Stage(entry, params, needs, (final(stage),), (run_dir(stage),), resources="train", made=made)


RESULTS = layout.RESULTS
MODEL = ("vqgan", "encoder", "transformer", "decoder")  # the parts inference loads
STAGES = {
    "default_data": Stage("data/default.py", ("data.default_count", "data.size", "data.default_seed"), (),
                          (layout.DEFAULT_DATA,), (layout.DEFAULT_DATA,)),
    "prepare": Stage("stages/prepare.py", ("data",), ("default_data",),
                     (f"{layout.SHARDS}/manifest.json",), (layout.SHARDS,)),
    "masks": Stage("stages/masks.py", ("masks",), ("prepare",),
                   (f"{layout.MASKS}/manifest.json", f"{layout.MASKS}/masks.png"), (layout.MASKS,)),
    # An imported VQGAN (vqgan.pretrained) has no discriminator: only vqgan.safetensors is sure.
    "vqgan": _trained("stages/vqgan.py", ("vqgan", "train", "weights"), ("prepare",), "vqgan", ("vqgan",)),
    "tokens": Stage("stages/tokens.py", (), ("prepare", "vqgan"), (f"{layout.TOKENS}/metrics.json",),
                    (layout.TOKENS,), resources="infer",
                    made=tuple(f"{layout.TOKENS}/{split}.{ext}" for split in SPLITS for ext in ("npy", "keys.json"))),
    "encoder": _trained("stages/encoder.py", ("encoder", "masks", "train"), ("prepare", "tokens", "vqgan"),
                        "encoder", ("encoder",)),
    "encoder_vanilla": _trained("stages/encoder.py", ("encoder", "masks", "train"),
                                ("prepare", "tokens", "vqgan"), "encoder_vanilla", ("encoder",)),
    "transformer": _trained("stages/transformer.py", ("transformer", "train"), ("tokens", "vqgan"),
                            "transformer", ("transformer",)),
    "decoder": _trained("stages/decoder.py", ("decoder", "masks", "train", "weights", "encoder"),
                        ("prepare", "tokens", "vqgan"), "decoder", ("decoder", "disc")),
    "evaluate": Stage("stages/evaluate.py", ("sample", "evaluate", "weights"), ("prepare", "masks", *MODEL),
                      (f"{RESULTS}/metrics.json", f"{RESULTS}/table1.md"), (f"{RESULTS}/table1.md",),
                      metrics=(f"{RESULTS}/metrics.json",), resources="infer"),
    # One job per name in evaluate.ablations ({variant}); vanilla_encoder also needs encoder_vanilla.
    "ablation": Stage("stages/evaluate.py", ("sample", "evaluate", "weights"), ("prepare", "masks", *MODEL),
                      (f"{RESULTS}/ablations/{{variant}}.json",), (f"{RESULTS}/ablations/{{variant}}.json",),
                      resources="infer"),
    "report": Stage("stages/report.py", ("sample",), ("prepare", "masks", *MODEL, "evaluate", "ablation"),
                    (f"{RESULTS}/report.md", f"{RESULTS}/samples.png"),
                    (f"{RESULTS}/report.md", f"{RESULTS}/samples.png", f"{RESULTS}/curves.png"),
                    made=(f"{RESULTS}/curves.png",)),
}
EXTRA_NEEDS = {"vanilla_encoder": "encoder_vanilla"}  # ablation variant -> the extra stage it needs


def ablation_needs(variant: str) -> tuple[str, ...]:
    return (*STAGES["ablation"].needs, *([EXTRA_NEEDS[variant]] if variant in EXTRA_NEEDS else []))


def ablation_files(config: dict) -> list[str]:
    return [STAGES["ablation"].done[0].format(variant=v) for v in config["evaluate"]["ablations"]]


def targets(config: dict) -> list[str]:
    """Every file the pipeline makes, for `rule all`. Snakemake reruns a job for a missing output
    only when something asks for that file, so asking for all of them is what makes deleting any
    one rerun the rule that makes it (and, its outputs now newer, the rules downstream)."""
    files: list[str] = []
    for rule, stage in STAGES.items():
        if rule == "default_data" and config["data"]["source"] != "default":
            continue  # a data.source of the user's own
        if rule == "encoder_vanilla" and not any(v in EXTRA_NEEDS for v in config["evaluate"]["ablations"]):
            continue  # trained only for the vanilla_encoder ablation
        files += ablation_files(config) if rule == "ablation" else stage.outputs
    return files


def inputs(rule: str, config: dict, variant: str | None = None) -> dict[str, str | list[str]]:
    """The files a rule reads, named by the rule that makes them: its `done` files (a list where
    it has several; every ablation's, for the report), and its `made` files as `<rule>_files`;
    `source` is the data folder, the default dataset or a data.source of the user's own."""
    files: dict[str, str | list[str]] = {}
    for need in ablation_needs(variant) if variant else STAGES[rule].needs:
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
    return files


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


def _dvc_stage(rule: str, target: str, needs: tuple[str, ...], outs: tuple[str, ...], config: dict,
               root: Path) -> dict:
    stage = STAGES[rule]
    deps = []
    for need in needs:
        if need == "default_data" and config["data"]["source"] != "default":
            continue  # a data.source of the user's own: Snakemake reads it, DVC does not hash it
        deps += [o.format(variant=v) for o in STAGES[need].outs
                 for v in (config["evaluate"]["ablations"] if need == "ablation" else [None])]
    return {
        "cmd": f"snakemake --cores all {target}",
        "deps": [*deps, *code_files(rule, root)],
        **({"params": list(stage.params)} if stage.params else {}),
        "outs": [{o: {"persist": True}} for o in outs],
        **({"metrics": [{m: {"persist": True}} for m in stage.metrics]} if stage.metrics else {}),
    }


def dvc_yaml(config: dict, root: Path = ROOT) -> str:
    """dvc.yaml for these params: one DVC stage per Snakemake job, whose cmd is that job's
    Snakemake target, deps the outputs it reads and the code it runs, params its sections, and
    outs persistent so that Snakemake's own incremental logic decides what is recomputed."""
    import yaml

    variants = config["evaluate"]["ablations"]
    stages = {}
    for rule, stage in STAGES.items():
        if rule == "encoder_vanilla" and not any(v in EXTRA_NEEDS for v in variants):
            continue  # trained only for the vanilla_encoder ablation, as in Snakemake's DAG
        if rule == "ablation":
            for v in variants:
                target = stage.done[0].format(variant=v)
                stages[f"ablation_{v}"] = _dvc_stage(rule, target, ablation_needs(v), (target,), config, root)
        else:
            stages[rule] = _dvc_stage(rule, stage.done[0], stage.needs, stage.outs, config, root)
    head = ("# Generated by `python workflow/dag.py > dvc.yaml` from workflow/dag.py and params.yaml: do not\n"
            "# edit. DVC versions what the Snakemake rules make; each stage's cmd is the Snakemake target of\n"
            "# its rule, so `dvc repro` runs the same rules (see README, Artifacts with DVC).\n")
    return head + yaml.safe_dump({"stages": stages}, sort_keys=False, width=120)


def load_config(params: Path) -> dict:
    import yaml

    return yaml.safe_load(params.read_text())


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--code"]:
        print("\n".join(code_files(args[1])))
    else:
        sys.stdout.write(dvc_yaml(load_config(Path(args[0]) if args else ROOT / "params.yaml")))
