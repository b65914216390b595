# latent-inpaint: the whole method as one workflow. Rules are thin: each calls one
# `latent-inpaint` subcommand with the params.yaml sections it depends on, so changing a
# parameter reruns exactly the rules that read it (Snakemake's params rerun trigger).
#   snakemake --cores all                                        # tiny CPU run, embedded data
#   snakemake --cores all --configfile workflow/configs/paper.yaml --config data='{source: DIR}'
#   snakemake --profile workflow/profiles/slurm                  # the same on a SLURM cluster

import json
import os
import sys

from latent_inpaint.config import ConfigError, validate
from latent_inpaint.tracking import ensure_invocation

configfile: "params.yaml"

try:
    # An unknown or misspelt key stops the workflow here, named; values become typed, so that
    # "--config data='{size: 64}'" and params.yaml's 64 count as the same parameter.
    config.update(validate(config))
except ConfigError as exc:
    sys.exit(f"latent-inpaint: parameter error: {exc}")

# One MLflow run per invocation: every job, local or submitted with sbatch, inherits this id.
ensure_invocation()
# Tracking settings travel in the environment, not as rule params: they must not rerun stages.
os.environ["LATENT_INPAINT_TRACKING"] = json.dumps(config["tracking"])


# What each job asks a scheduler for (params.yaml `resources`; the slurm profile turns it into
# sbatch options). Resources are no rerun trigger: a bigger allocation retrains nothing.
RES = config["resources"]
PROCESSES = RES["processes"]  # training processes per job, started by torchrun inside the job


def job_resources(kind, gpus=1):
    """mem_mb and runtime of a train|infer|light job, and its GPUs when resources.gpu is on."""
    return {**RES[kind], "gpu": gpus if RES["gpu"] else 0}


def sections(*names):
    """The given params.yaml sections as JSON, for `--config-json` and as a rerun trigger."""
    return json.dumps({name: config[name] for name in names}, sort_keys=True)


include: "workflow/rules/data.smk"
include: "workflow/rules/vqgan.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        rules.report.output,
