# latent-inpaint: the whole method as one workflow. What each rule reads, makes and runs is
# defined once in workflow/dag.py (dvc.yaml is generated from it); the rules are thin calls of
# one `latent-inpaint` subcommand each.
#   snakemake --cores all                                        # tiny CPU run, embedded data
#   snakemake --cores all --configfile workflow/configs/paper.yaml --config data='{source: DIR}'
#   snakemake --profile workflow/profiles/slurm                  # the same on a SLURM cluster
#   snakemake --cores all --config pretrained='{official: DIR, model: places256}'  # the authors' models

configfile: "params.yaml"
report: "workflow/report/workflow.rst"  # `snakemake --report`: results marked report() in the rules


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
if IMPORT in RULES:  # pretrained.official: the authors' models are imported, nothing is trained
    include: "workflow/rules/official.smk"
else:
    include: "workflow/rules/vqgan.smk"
    include: "workflow/rules/models.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        targets(config),  # every artifact: deleting one reruns what makes it (workflow/dag.py)
    default_target: True
