"""The real tools on a tiny copy of the project: Snakemake reruns, MLflow runs, DVC push/pull."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, venv_bin

pytestmark = pytest.mark.slow

TINY = {
    "data": {"default_count": 24, "size": 32, "shard_size": 8},
    "masks": {"grid_count": 4},
    "train": {"workers": 0, "eval_images": 4, "checkpoint_every": 4},
    "vqgan": {"steps": 6, "batch_size": 4, "disc_start": 3},
    "encoder": {"steps": 4, "batch_size": 4},
    "transformer": {"steps": 4, "batch_size": 4},
    "decoder": {"steps": 4, "batch_size": 4},
    "evaluate": {"fid_images": 4, "diversity_images": 2, "diversity_samples": 2, "fid_dims": 64,
                 "ablations": ["full", "t0.5", "vanilla_decoder", "biharmonic"]},
}


def make_project(dest: Path) -> Path:
    """A copy of the workflow files with a params.yaml shrunk to seconds of work."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "workflow", "dvc.yaml", ".dvc", ".dvcignore", "src", "data", "runs", "results"):
        src = REPO / name
        if src.is_dir():
            made = ("default", "shards", "masks", "tokens", "vqgan", "encoder*", "transformer", "decoder",
                    "ablations", "*.md", "*.png", "*.json", "inpaint")  # pipeline outputs, not sources
            artifacts = made if name in ("data", "runs", "results") else ()
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache", *artifacts))
        else:
            shutil.copy2(src, dest / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for sec, values in TINY.items():
        params[sec].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def sh(cwd: Path, *cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": venv_bin()}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's embedded store in its working dir
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600, check=False)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-5000:]}"
    return proc


def digests(root: Path, *folders: str) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in folders
        for p in sorted((root / folder).rglob("*"))
        if p.is_file()
    }


def set_param(project: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_snakemake_runs_tracks_and_reruns_only_what_changed(tmp_path):
    project = make_project(tmp_path)
    sh(project, "snakemake", "--cores", "2")
    manifest = yaml.safe_load((project / "data/shards/manifest.json").read_text())
    assert manifest["written"] == 24
    assert (project / "data/masks/masks.png").is_file()
    assert (project / "data/tokens/train.npy").is_file()
    for stage in ("vqgan", "encoder", "transformer", "decoder"):
        assert (project / f"runs/{stage}/final/config.json").is_file()
    report = (project / "results/report.md").read_text()
    assert "| ours |" in report and "| biharmonic (classical) |" in report and "Ablations" in report
    assert "Stand-in (random) weights" in report and (project / "results/samples.png").is_file()
    metrics = yaml.safe_load((project / "results/metrics.json").read_text())
    assert set(metrics["ours"]) >= {"small", "large", "box", "diversity"}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "latent-inpaint"]
    (run,) = client.search_runs([experiment.experiment_id])  # one run for the whole invocation
    assert run.data.params["data.size"] == "32" and run.data.params["masks.seed"] == "2024"
    assert run.data.metrics["prepare/images_written"] == 24
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"prepare", "masks", "vqgan"}
    assert "vqgan/rec_loss" in run.data.metrics and "tokens/perplexity" in run.data.metrics

    assert "Nothing to be done" in sh(project, "snakemake", "--cores", "2").stdout
    shards_before = digests(project, "data/shards")
    prepared_at = (project / "data/shards/manifest.json").stat().st_mtime_ns

    set_param(project, "sample", "temperature", 0.5)  # reruns sampling and evaluation, no training
    plan = sh(project, "snakemake", "--cores", "2", "--dry-run").stdout
    assert "rule evaluate" in plan and "rule report" in plan and "rule ablation" in plan
    trained = ("default_data", "prepare", "masks", "vqgan", "tokens", "encoder", "transformer", "decoder")
    assert not any(f"rule {r}:" in plan for r in trained), plan
    sh(project, "snakemake", "--cores", "2")

    set_param(project, "masks", "seed", 7)
    plan = sh(project, "snakemake", "--cores", "2", "--dry-run").stdout
    assert "rule masks:" in plan
    assert not any(f"rule {r}:" in plan for r in ("default_data", "prepare", "vqgan", "tokens", "transformer"))
    assert "rule encoder:" in plan and "rule decoder:" in plan  # they train under masks.train
    masks_before = digests(project, "data/masks")
    sh(project, "snakemake", "--cores", "2")
    assert (project / "data/shards/manifest.json").stat().st_mtime_ns == prepared_at
    assert digests(project, "data/shards") == shards_before
    assert digests(project, "data/masks") != masks_before

    # A new learning rate retrains the transformer alone, from scratch; the old run is kept aside.
    set_param(project, "transformer", "lr", 1.0e-3)
    plan = sh(project, "snakemake", "--cores", "2", "--dry-run").stdout
    assert "rule transformer:" in plan
    assert not any(f"rule {r}:" in plan for r in ("vqgan", "encoder", "decoder"))
    sh(project, "snakemake", "--cores", "2")
    final = yaml.safe_load((project / "runs/transformer/final/config.json").read_text())
    assert final["config"]["transformer"]["lr"] == 1.0e-3 and final["resumed_from"] == []
    assert (project / "runs/transformer/previous/checkpoint/config.json").is_file()

    bad = sh(project, "snakemake", "--cores", "2", "--config", "data={sise: 3}", ok=False)
    assert bad.returncode != 0 and "unknown key(s) in data: sise" in bad.stdout


def test_dvc_push_delete_pull_restores_the_same_bytes(tmp_path):
    project = make_project(tmp_path / "project")
    sh(project, "git", "init", "-q")
    sh(project, "dvc", "repro")
    assert (project / "dvc.lock").is_file()
    artifacts = ("data/default", "data/shards", "data/masks", "runs/vqgan", "data/tokens", "runs/encoder",
                 "runs/encoder_vanilla", "runs/transformer", "runs/decoder", "results/ablations")
    results = ("results/metrics.json", "results/report.md", "results/samples.png")
    before = digests(project, *artifacts) | {f: (project / f).read_bytes() for f in results}
    assert len(before) > 30

    sh(project, "dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"))
    sh(project, "dvc", "push")
    for folder in artifacts:
        shutil.rmtree(project / folder)
    for file in results:
        (project / file).unlink()
    shutil.rmtree(project / ".dvc" / "cache")
    sh(project, "dvc", "pull")
    assert digests(project, *artifacts) | {f: (project / f).read_bytes() for f in results} == before
    assert "up to date" in sh(project, "dvc", "status").stdout

    # Snakemake's bookkeeping agrees once told the pulled files are current.
    shutil.rmtree(project / ".snakemake")
    sh(project, "snakemake", "--cores", "2", "--touch")
    assert "Nothing to be done" in sh(project, "snakemake", "--cores", "2", "--dry-run").stdout
