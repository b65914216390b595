"""results/report.md: the tables, pluralistic sample grids and training curves of one pipeline run;
and the paper's Figure 3 (`latent-inpaint figure-alpha`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import SampleConfig, section
from ..evaluate.report import table_markdown
from ..files import atomic_write
from ..inpaint import Inpainter, pick_device
from ..masks import eval_mask, load_mask
from ..pictures import token_mask_figure
from .evaluate import ours, sample_grid, table_rows

STAGES = ("vqgan", "encoder", "transformer", "decoder")
PAPER = {  # Table 1, Places 256 (for orientation only: other data, other scale)
    "paper (Places, 256 px)": {"FID small": 1.02, "FID large": 2.82, "FID box": 13.30, "diversity (box)": (0.29, 0.06)},
}


def history(run_dir: Path) -> list[dict]:
    """Logged losses of a run, the last record of each step (a resumed run repeats steps)."""
    records: dict[int, dict] = {}
    path = run_dir / "history.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            records[record["step"]] = record
    return [records[s] for s in sorted(records)]


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
            ax.plot([r["step"] for r in records if key in r], [r[key] for r in records if key in r], label=key[5:])
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def ablation_table(paths: list[Path]) -> str:
    rows = {}
    stand_in: set[str] = set()
    for path in paths:
        result = json.loads(path.read_text())
        stand_in |= set(result.get("stand_in", []))
        (method,) = [m for m, r in result.items() if isinstance(r, dict) and "box" in r]
        rows[result.get("variant", method)] = {"FID box": result[method]["box"]["fid"],
                                                "hole PSNR box": result[method]["box"]["hole_psnr"],
                                                "SSIM box": result[method]["box"]["ssim"]}
    return table_markdown(rows, ["FID box", "hole PSNR box", "SSIM box"],
                          "Ablations (box mask; shaped like the paper's Tables 2 and 3)", stand_in=sorted(stand_in))


def write_report(results_dir: Path, runs_dir: Path, shards_dir: Path, masks_dir: Path, sample: SampleConfig,
                 device, ablations: list[str]) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    metrics = json.loads((results_dir / "metrics.json").read_text())
    rows, columns = table_rows(metrics)
    parts = [
        "# latent-inpaint: results of this pipeline run",
        "",
        table_markdown({**rows, **PAPER}, columns, f"Test split, {metrics['images']['fid']} images; diversity over "
                       f"{metrics['images']['diversity']} images x {metrics['images']['samples']} samples (box mask)",
                       stand_in=metrics.get("stand_in", [])),
    ]
    if ablations:
        parts.append(ablation_table([Path(a) for a in ablations]))
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
        device: str | None = None) -> str:
    """Write results/report.md from the evaluation's metrics (and `ablations`' JSON files), the
    trained runs, the test shards and the evaluation masks; return a summary."""
    path = write_report(Path(results), Path(runs), Path(shards), Path(masks), section(params, "sample"),
                        pick_device(device), ablations=list(ablations))
    return f"report written to {path}"


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
