# What every rule shares (validated params, paths, params sections, code digests, resources);
# functions live here and rules in the other files, as snakemake --lint asks.

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))

from dag import (IMPORT, STAGES, ablation_files, code_digest, dvc_yaml, inputs, pipeline,  # noqa: E402
                 skipped_ablations, targets)
from latent_inpaint.config import ConfigError, validate  # noqa: E402
from latent_inpaint.layout import LOGS  # noqa: E402
from latent_inpaint.tracking import TRACKING_ENV, ensure_invocation  # noqa: E402

try:
    # An unknown or misspelt key stops the workflow here, named; values become typed, so that
    # "--config data='{size: 64}'" and params.yaml's 64 count as the same parameter.
    config.update(validate(config))
except ConfigError as exc:
    print(f"latent-inpaint: parameter error: {exc}", file=sys.stderr)
    sys.exit(2)  # the CLI's code for usage and parameter errors

PROJECT = Path(workflow.basedir)
RULES = pipeline(config)  # the rules this config runs (workflow/dag.py)
ABLATION_FILES = ablation_files(config)  # results/ablations/<variant>.json, one per evaluate.ablations name
# The project's one software environment, for `--sdm conda`; otherwise the active one (.venv).
ENV = "../envs/latent-inpaint.yaml"
TRAIN = config["train"]
PROCESSES = config["resources"]["processes"]  # training processes per job, started by torchrun inside it
TRAIN_THREADS = PROCESSES * (TRAIN["workers"] + 1)

# One MLflow parent run per invocation: every job, local or submitted with sbatch, inherits this
# id. Tracking settings travel in the environment too: they must not rerun stages. Both are set
# here for the jobs, not read from the user's environment, so no `envvars:` assertion applies.
ensure_invocation()
os.environ.update({TRACKING_ENV: json.dumps(config["tracking"])})

if (PROJECT / "dvc.yaml").is_file() and (PROJECT / "dvc.yaml").read_text() != dvc_yaml(config, PROJECT):
    print("latent-inpaint: dvc.yaml does not match workflow/dag.py and these params; DVC users: "
          "python workflow/dag.py > dvc.yaml", file=sys.stderr)


# What `snakemake --report` shows: the outputs of these rules that have a caption in
# workflow/report/ (<file name>.rst; an ablation's is ablation.rst, its variant a label), by category.
CAPTIONS = PROJECT / "workflow" / "report"
SHOWN = {"masks": "Evaluation masks", "evaluate": "Evaluation", "ablation": "Ablations", "report": "Report"}


def shown(rule, files):
    """`files` (one output of `rule`, or several), those with a caption marked report()."""
    if isinstance(files, str):
        return shown(rule, [files])[0]
    marked = []
    for file in files:
        stem = Path(file).stem
        caption = CAPTIONS / f"{rule if rule == 'ablation' else stem}.rst"
        labels = {"variant": stem} if rule == "ablation" else None
        marked.append(report(file, caption=str(caption), category=SHOWN[rule], labels=labels)
                      if caption.is_file() else file)
    return marked


def folder(path, up=1):
    """The folder `up` levels above a file: data/shards/manifest.json -> data/shards."""
    return str(Path(path).parents[up - 1])


def runs_folder(input):
    """The runs/ folder above the final/ of the models among `input`, trained or imported."""
    return next(folder(f, 3) for f in input if Path(f).parts[-2:] == ("final", "config.json"))


def sections(rule):
    """The params.yaml sections (or section.key) that `rule` reads, as JSON; passed to its
    command, and a rerun trigger."""
    picked = {}
    for name in STAGES[rule].params:
        section, _, key = name.partition(".")
        picked[section] = {**picked.get(section, {}), key: config[section][key]} if key else config[section]
    return json.dumps(picked, sort_keys=True)


def code(rule):
    """A digest of the code that `rule` runs (see workflow/dag.py); a rerun trigger."""
    return code_digest(rule, PROJECT)


def job_resources(rule, gpus=1):
    """mem_mb and runtime of the job kind of `rule`, and its GPUs when resources.gpu is on."""
    kind = STAGES[rule].resources
    gpu = config["resources"]["gpu"] and kind != "light"
    return {**config["resources"][kind], "gpu": gpus if gpu else 0}


def training(rule):
    """Resources of a training job; `processes` GPUs (or gloo CPU processes) under torchrun."""
    return {**job_resources(rule, gpus=PROCESSES), "processes": PROCESSES}
