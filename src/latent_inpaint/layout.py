"""Where a project keeps what the pipeline makes, relative to its folder.

The one spelling of each path: the workflow (workflow/dag.py) builds its rules from these, and
the CLI's defaults are these, so a command run by hand reads and writes what the rules do.
"""

DEFAULT_DATA = "data/default"  # the embedded default dataset
SHARDS = "data/shards"
MASKS = "data/masks"
TOKENS = "data/tokens"
RUNS = "runs"  # runs/<stage>/: checkpoint/, final/, metrics.json, history.jsonl, curves.json
CURVES = "curves.json"  # in a run folder: history.jsonl as one JSON list, what `dvc plots` reads
RESULTS = "results"
PLOTS = "plots"  # results/plots/: the evaluation and ablation numbers as records, for `dvc plots`
LOGS = "logs"


def run_dir(stage: str) -> str:
    return f"{RUNS}/{stage}"


def final(stage: str) -> str:
    """The file that stands for a trained stage: its final/ folder's config, written last."""
    return f"{run_dir(stage)}/final/config.json"
