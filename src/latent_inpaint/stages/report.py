"""results/report.md: the tables, pluralistic sample grids and training curves of one pipeline run;
and the paper's Figure 3 (`latent-inpaint figure-alpha`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import SampleConfig, section
from ..evaluate.report import table_markdown
from ..files import atomic_write
from ..inpaint import Inpainter, pick_device
from ..layout import CURVES, PLOTS
from ..masks import eval_mask, load_mask
from ..pictures import token_mask_figure
from ..tracking import EVALUATION_ARTIFACTS, Tracker, git_state, invocation_run, tracking_config
from .evaluate import images_title, ours, sample_grid, table_rows

STAGES = ("vqgan", "encoder", "transformer", "decoder")
PAPER = {  # Table 1, Places 256 (for orientation only: other data, other scale)
    "paper (Places, 256 px)": {"FID small": 1.02, "FID large": 2.82, "FID box": 13.30, "diversity (box)": (0.29, 0.06)},
}


def history(run_dir: Path) -> list[dict]:
    """Logged losses of a finished run, a record per step (its curves.json); none without it."""
    path = run_dir / CURVES
    return json.loads(path.read_text()) if path.is_file() else []


def curves(runs_dir: Path, out: Path) -> bool:
    """One panel per stage with its logged losses against the step; False if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {stage: history(runs_dir / stage) for stage in STAGES}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        return False
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3), squeeze=False)
    for ax, (stage, records) in zip(axes[0], runs.items()):
        keys = sorted({k for r in records for k in r if k.startswith("loss/")})
        for key in keys:
            logged = [r for r in records if r.get(key) is not None]  # the GAN losses start at disc_start
            ax.plot([r["step"] for r in logged], [r[key] for r in logged], label=key[5:])
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def ablation_results(paths: list[Path]) -> tuple[dict[str, dict], list[str]]:
    """variant -> its box-mask numbers, and the stand-in networks any of them was measured with."""
    results = {}
    stand_in: set[str] = set()
    for path in paths:
        result = json.loads(path.read_text())
        stand_in |= set(result.get("stand_in", []))
        (method,) = [m for m, r in result.items() if isinstance(r, dict) and "box" in r]
        results[result.get("variant", method)] = result[method]["box"]
    return results, sorted(stand_in)


def plot_records(metrics: dict, ablations: dict[str, dict]) -> dict[str, list[dict]]:
    """The evaluation (a record per method and mask kind) and the ablations (a record per
    variant) as the lists of records `dvc plots` reads: file name -> records."""
    evaluation = [{"result": f"{method}, {kind}", "method": method, "mask": kind, **result[kind]}
                  for method, result in metrics.items() if isinstance(result, dict) and "box" in result
                  for kind in ("small", "large", "box") if kind in result]
    return {"evaluation.json": evaluation,
            "ablations.json": [{"variant": variant, **box} for variant, box in ablations.items()]}


def ablation_table(results: dict[str, dict], stand_in: list[str]) -> str:
    rows = {variant: {"FID box": box["fid"], "hole PSNR box": box["hole_psnr"], "SSIM box": box["ssim"]}
            for variant, box in results.items()}
    return table_markdown(rows, ["FID box", "hole PSNR box", "SSIM box"],
                          "Ablations (box mask; shaped like the paper's Tables 2 and 3)", stand_in=stand_in)


def commit(folder: Path) -> str:
    """The git commit of the code in `folder` (marked when tracked files differ from it)."""
    head, dirty = git_state(folder)
    if head == "unknown":
        return "unknown (not a git checkout)"
    return head[:12] + (" with uncommitted changes" if dirty == "true" else "")


def weights_used(runs_dir: Path, models: list[str]) -> str:
    """Which weights the numbers come from: per model folder of runs_dir that exists, trained here
    or imported (from which file), and its weight files with sizes and sha256 (config.json's)."""
    lines = ["### Weights used", "", "| model | origin | weight files |", "|---|---|---|"]
    code = commit(Path.cwd())  # the same for every model trained here: ask git once
    for config in (runs_dir / m / "final" / "config.json" for m in models):
        if not config.is_file():
            continue
        info = json.loads(config.read_text())
        if info.get("imported_from"):
            released = f"the authors' {info['official_model']} model, " if info.get("official_model") else ""
            size = f" ({info['source_bytes']:,} bytes)" if "source_bytes" in info else ""
            origin = f"imported: {released}{info['imported_from']}{size}"
        else:
            origin = f"trained here: {info.get('step')} steps, code at commit {code}"
        files = "; ".join(f"{name} {(config.parent / name).stat().st_size:,} bytes, sha256 {digest[:16]}"
                          for name, digest in sorted(info.get("files", {}).items()))
        lines.append(f"| {config.parent.parent.name} | {origin} | {files} |")
    return "\n".join(lines) + "\n"


def write_report(results_dir: Path, runs_dir: Path, shards_dir: Path, masks_dir: Path, sample: SampleConfig,
                 device, ablations: list[str], skipped: dict[str, str] | None = None) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    metrics = json.loads((results_dir / "metrics.json").read_text())
    rows, columns = table_rows(metrics)
    parts = [
        "# latent-inpaint: results of this pipeline run",
        "",
        table_markdown({**rows, **PAPER}, columns, f"Test split, {images_title(metrics['images'])}; diversity over "
                       f"{metrics['images']['diversity']} images x {metrics['images']['samples']} samples (box mask)",
                       stand_in=metrics.get("stand_in", [])),
    ]
    found, stand_in = ablation_results([Path(a) for a in ablations])
    if found:
        parts.append(ablation_table(found, stand_in))
    parts += [f"Ablation {name} not scored: {reason}.\n" for name, reason in (skipped or {}).items()]
    vanilla = ["encoder_vanilla"] if "vanilla_encoder" in found else []
    parts.append(weights_used(runs_dir, [*STAGES, "refiner", *vanilla]))
    (results_dir / PLOTS).mkdir(exist_ok=True)
    for name, records in plot_records(metrics, found).items():
        atomic_write(results_dir / PLOTS / name, (json.dumps(records, indent=1) + "\n").encode())
    inpainter = Inpainter.from_runs(runs_dir, device)
    sample_grid(ours(inpainter, sample), shards_dir, masks_dir, count=4, samples=4).save(results_dir / "samples.png")
    parts += ["### Pluralistic samples (box mask): input, masked input, 4 samples", "", "![samples](samples.png)", ""]
    if curves(runs_dir, results_dir / "curves.png"):
        parts += ["### Training curves", "", "![curves](curves.png)", ""]
    parts += ["### Evaluation masks (small, large, box)", "",
              f"![masks]({Path('..') / masks_dir / 'masks.png'})", ""]
    path = results_dir / "report.md"
    atomic_write(path, "\n".join(parts).encode())
    return path


def run(params: dict, results: Path, runs: Path, shards: Path, masks: Path, *, ablations: list[str] = (),
        skipped: dict[str, str] | None = None, device: str | None = None) -> str:
    """Write results/report.md from the evaluation's metrics (and `ablations`' JSON files; those
    `skipped` are named with the reason), the trained or imported runs, the test shards and the
    evaluation masks; return a summary."""
    path = write_report(Path(results), Path(runs), Path(shards), Path(masks), section(params, "sample"),
                        pick_device(device), ablations=list(ablations), skipped=skipped)
    with invocation_run(tracking_config(params)) as tracker:
        log_results(tracker, Path(results), Path(masks), [Path(a) for a in ablations])
    return f"report written to {path}"


def log_results(tracker: Tracker, results_dir: Path, masks_dir: Path, ablations: list[Path]) -> None:
    """To the pipeline's run: the report with its pictures under report/, the evaluation's and the
    ablations' numbers as metrics (`evaluate/...`, `ablation/<name>/...`) with their JSON, tables
    and plot records under evaluation/."""
    pictures = [results_dir / "report.md", results_dir / "samples.png", results_dir / "curves.png",
                masks_dir / "masks.png"]
    for path in [p for p in pictures if p.is_file()]:
        tracker.log_artifact(path, "report")
    tracker.log_evaluation(results_dir / "metrics.json", "evaluate")
    for path in ablations:
        tracker.log_evaluation(path, f"ablation/{path.stem}")
    for path in sorted(results_dir.glob("*.md")):
        if path.name != "report.md":
            tracker.log_artifact(path, EVALUATION_ARTIFACTS)
    if (results_dir / PLOTS).is_dir():
        tracker.log_artifact(results_dir / PLOTS, EVALUATION_ARTIFACTS)


def alpha_figure(params: dict, out: Path, *, mask_file: str | None = None, white_is_visible: bool = False,
                 kind: str = "large", index: int = 0, size: int | None = None, factor: int | None = None,
                 alphas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)) -> str:
    """The paper's Figure 3 for a mask file or fixed evaluation mask `index` of `kind` (val split);
    `factor` (image side / token grid side) defaults to the VQGAN's; return a summary."""
    if mask_file:
        mask = load_mask(mask_file, hole_is_white=not white_is_visible)
    else:
        mask = eval_mask(kind, size or section(params, "data").size, section(params, "masks"), "val", index)
    factor = factor or section(params, "vqgan").factor
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    token_mask_figure(mask, alphas=tuple(alphas), factor=factor).save(out)
    return f"wrote {out}"
