"""The real tools on a tiny copy of the project: Snakemake reruns, MLflow runs, DVC push/pull."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, venv_bin
from PIL import Image

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
    for name in ("Snakefile", "workflow", "dvc.yaml", ".dvc", ".dvcignore", ".gitignore", "src", "data", "runs",
                 "results"):
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
    # dvc.yaml for these params (its ablation stages follow evaluate.ablations)
    dvc = subprocess.run([sys.executable, "workflow/dag.py", "params.yaml"], cwd=dest, check=True, text=True,
                         stdout=subprocess.PIPE).stdout
    (dest / "dvc.yaml").write_text(dvc)
    return dest


def sh(cwd: Path, *cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": venv_bin()}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's embedded store in its working dir
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600, check=False)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-5000:]}"
    return proc


def files(root: Path, *paths: str) -> list[Path]:
    """The files at the given paths: a file itself, a folder's files at any depth."""
    return [q for p in paths for q in ([root / p] if (root / p).is_file() else sorted((root / p).rglob("*")))
            if q.is_file()]


def digests(root: Path, *paths: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files(root, *paths)}


def dvc_outputs(project: Path) -> list[str]:
    """Every path a dvc.yaml stage versions (outs and metrics)."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    return [out if isinstance(out, str) else next(iter(out))
            for stage in stages.values() for kind in ("outs", "metrics") for out in stage.get(kind, [])]


def set_param(project: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def planned(project: Path) -> set[str]:
    """The rules `snakemake -n` would run."""
    return set(re.findall(r"^rule (\w+):", sh(project, "snakemake", "--cores", "2", "--dry-run").stdout, re.M))


def dvc_changed(project: Path) -> set[str]:
    """The stages `dvc status` reports changed."""
    return set(re.findall(r"^([\w.@-]+):$", sh(project, "dvc", "status").stdout, re.M))


def test_dvc_yaml_is_generated_from_the_workflow_definition():
    """dvc.yaml is what workflow/dag.py makes for params.yaml: no hand-kept second copy to drift."""
    generated = subprocess.run([sys.executable, "workflow/dag.py"], cwd=REPO, check=True, text=True,
                               stdout=subprocess.PIPE).stdout
    assert (REPO / "dvc.yaml").read_text() == generated, "dvc.yaml is stale: python workflow/dag.py > dvc.yaml"
    stages = yaml.safe_load(generated)["stages"]
    sampler = "src/latent_inpaint/sampler.py"
    assert {name for name, s in stages.items() if sampler in s["deps"]} == {"report", "evaluate", "ablation"}
    # One stage scores every ablation (one process), each its own metrics file; only vanilla_encoder's
    # extra model is among its deps.
    variants = yaml.safe_load((REPO / "params.yaml").read_text())["evaluate"]["ablations"]
    assert [next(iter(m)) for m in stages["ablation"]["metrics"]] == [f"results/ablations/{v}.json" for v in variants]
    assert "runs/encoder_vanilla" in stages["ablation"]["deps"]
    assert "runs/encoder_vanilla" not in stages["report"]["deps"]
    assert "src/latent_inpaint/vqgan.py" in stages["decoder"]["deps"] and "runs/vqgan" in stages["decoder"]["deps"]
    assert stages["transformer"]["params"] == ["transformer", "train"]


def test_snakemake_lint_is_clean():
    proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "--lint"], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300, check=False)
    assert proc.returncode == 0 and "Congratulations" in proc.stdout, proc.stdout[-3000:]


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
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # one for the whole invocation
    assert parent.info.status == "FINISHED"
    assert sum(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs) == len(runs) - 1
    child = {r.info.run_name: r for r in runs if r is not parent}  # a child run per stage
    assert {"prepare", "masks", "vqgan", "tokens", "encoder", "transformer", "decoder"} <= set(child)
    assert child["prepare"].data.params["data.size"] == "32" and child["masks"].data.params["masks.seed"] == "2024"
    assert child["prepare"].data.metrics["images_written"] == 24
    assert all(client.list_artifacts(child[s].info.run_id) for s in ("prepare", "masks", "vqgan"))
    assert "rec_loss" in child["vqgan"].data.metrics and "perplexity" in child["tokens"].data.metrics

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
    assert final["models"]["transformer"]["transformer"]["lr"] == 1.0e-3 and final["resumed_from"] == []
    assert (project / "runs/transformer/previous/checkpoint/config.json").is_file()

    bad = sh(project, "snakemake", "--cores", "2", "--config", "data={sise: 3}", ok=False)
    assert bad.returncode != 0 and "unknown key(s) in data: sise" in bad.stdout

    # The README's route for a Snakemake-made run: `dvc commit --force` records it in dvc.lock.
    sh(project, "git", "init", "-q")
    assert dvc_changed(project) >= {"prepare", "vqgan", "decoder", "report"}  # no dvc.lock yet
    sh(project, "dvc", "commit", "--force")
    assert "Data and pipelines are up to date" in sh(project, "dvc", "status").stdout
    assert "Data and pipelines are up to date" in sh(project, "dvc", "repro").stdout  # retrains nothing


PLAIN_PATH = "/usr/bin:/bin"  # a plain shell's: no venv activated


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> Path:
    """A tiny project that `dvc repro` has run end to end, from a plain shell (its .venv not
    activated: dvc.yaml's commands find it), with its dvc.lock."""
    project = make_project(tmp_path_factory.mktemp("reproduced") / "project")
    sh(project, "git", "init", "-q")
    (project / ".venv").symlink_to(sys.prefix)  # the project's environment, as workflow/setup.sh makes it
    with open(project / ".git/info/exclude", "a") as f:
        f.write(".venv\n")  # .gitignore's `.venv/` matches the folder, not this link to it
    assert not any(shutil.which(tool, path=PLAIN_PATH) for tool in ("snakemake", "latent-inpaint"))
    env = {"PATH": PLAIN_PATH, "HOME": os.environ.get("HOME", "/root")}
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=project, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=3000, check=False)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return project


def test_dvc_pull_in_a_fresh_clone_restores_the_bytes_and_retrains_nothing(reproduced, tmp_path):
    project = reproduced
    outputs = dvc_outputs(project)
    trained = digests(project, *outputs)
    assert len(trained) > 30 and "runs/decoder/final/config.json" in trained
    sh(project, "dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"))
    sh(project, "dvc", "push")
    sh(project, "git", "config", "user.name", "latent-inpaint tests")
    sh(project, "git", "config", "user.email", "tests@example.invalid")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-q", "-m", "tiny run")
    committed = sh(project, "git", "ls-files").stdout.split()
    assert {"dvc.lock", ".dvc/config", "params.yaml", "Snakefile", "data/.gitignore"} <= set(committed)
    local_only = (*outputs, ".snakemake", ".dvc/cache", "logs", "mlflow.db", "mlruns", ".latent-inpaint")
    in_git = [f for f in committed if any(f == p or f.startswith(f"{p}/") for p in local_only)]
    assert not in_git, in_git  # git holds the code, params and dvc.lock; DVC holds the bytes

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    assert not any((clone / p).exists() for p in local_only)
    sh(clone, "dvc", "pull")
    assert digests(clone, *outputs) == trained
    assert "up to date" in sh(clone, "dvc", "status").stdout

    # A clone has no .snakemake/ metadata and checkout-order file times. --touch alone would touch
    # only the jobs those times make look stale; --forceall touches every job in DAG order and
    # records its params, code and inputs, so later changes rerun exactly what depends on them.
    sh(clone, "snakemake", "--cores", "2", "--touch", "--forceall")
    summary = sh(clone, "snakemake", "--summary").stdout
    header, *rows = [line.split("\t") for line in summary.splitlines() if line.count("\t") == 5]
    assert header[-2:] == ["status", "plan"], summary
    assert {r[2] for r in rows} >= {"default_data", "prepare", "vqgan", "encoder", "transformer", "decoder"}, summary
    assert all(r[-2:] == ["ok", "no update"] for r in rows), summary

    # The pipeline in the clone: nothing to do, so no file written, no stage started.
    stamps = {p: p.stat().st_mtime_ns for p in files(clone, *outputs)}
    run = sh(clone, "snakemake", "--cores", "2").stdout
    assert "Nothing to be done" in run, f"{run}\n{summary}"
    assert {p: p.stat().st_mtime_ns for p in files(clone, *outputs)} == stamps
    assert digests(clone, *outputs) == trained
    assert not (clone / "mlflow.db").exists()  # no stage opened its MLflow run
    assert not any(log.stat().st_size for log in (clone / "logs").iterdir())  # created empty by --touch
    assert "Data and pipelines are up to date" in sh(clone, "dvc", "repro").stdout

    # Inpainting from the pulled parts (runs/*/final) keeps every visible pixel.
    picture = min((clone / "data/default").glob("*.png"))
    image = np.asarray(Image.open(picture).convert("RGB"))
    h, w = image.shape[:2]
    hole = np.zeros((h, w), np.uint8)
    hole[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255  # white = hole
    Image.fromarray(hole).save(tmp_path / "hole.png")
    sh(clone, "latent-inpaint", "inpaint", str(picture), "--mask", str(tmp_path / "hole.png"), "--samples", "2",
       "--steps", "2")
    visible = hole == 0
    samples = sorted((clone / "results/inpaint" / picture.name).glob("sample_*.png"))
    assert len(samples) == 2
    for sample in samples:
        assert np.array_equal(np.asarray(Image.open(sample))[visible], image[visible])

    # The recorded metadata makes later changes rerun exactly the rules that read them.
    pulled_params = (clone / "params.yaml").read_text()
    set_param(clone, "sample", "temperature", 0.5)
    plan = sh(clone, "snakemake", "--cores", "2", "--dry-run").stdout
    assert "rule evaluate:" in plan and "rule report:" in plan
    upstream = ("default_data", "prepare", "masks", "vqgan", "tokens", "encoder", "transformer", "decoder")
    assert not any(f"rule {r}:" in plan for r in upstream), plan
    (clone / "params.yaml").write_text(pulled_params)
    set_param(clone, "data", "default_seed", 5)  # a rule without inputs: only its recorded params can tell
    plan = sh(clone, "snakemake", "--cores", "2", "--dry-run").stdout
    assert "rule default_data:" in plan and "rule vqgan:" in plan, plan


def test_job_resources_come_from_params(tmp_path):
    """What each job asks a scheduler for is read from params.yaml `resources`, per job kind."""
    project = make_project(tmp_path)

    def plan(*args: str) -> dict[str, str]:
        out = sh(project, "snakemake", "--dry-run", "--forceall", "--printshellcmds", "--cores", "64",
                 "runs/vqgan/final/config.json", "data/tokens/metrics.json", *args).stdout
        jobs = re.split(r"\n(?=rule \w+:)", out)
        return {m.group(1): job for job in jobs if (m := re.match(r"rule (\w+):", job))}

    tiny = plan()
    assert "gpu=0" in tiny["vqgan"] and "processes=1" in tiny["vqgan"] and "mem_mb=4000" in tiny["vqgan"]
    assert "train-vqgan --quiet --processes 1 " in tiny["vqgan"]
    paper = plan("--configfile", str(REPO / "workflow/configs/paper.yaml"))
    assert all(f in paper["vqgan"] for f in ("gpu=3", "processes=3", "mem_mb=64000", "runtime=2880"))
    assert "train-vqgan --quiet --processes 3 " in paper["vqgan"]
    assert "gpu=1" in paper["tokens"] and "runtime=720" in paper["tokens"]
    assert "gpu=0" in paper["prepare"] and "mem_mb=16000" in paper["prepare"]


def edit(path: Path, old: str | None, new: str) -> str:
    """Replace the first `old` in a file by `new` (append `new` when `old` is None); return the
    original text."""
    text = path.read_text()
    assert old is None or old in text, f"{old!r} not in {path}"
    path.write_text(text + new if old is None else text.replace(old, new, 1))
    return text


def test_a_code_edit_reruns_exactly_the_rules_that_run_that_code(reproduced):
    """The code of a rule is the import closure of its entry module (workflow/dag.py). Snakemake
    compares a digest of its syntax trees, so comments and docstrings rerun nothing; DVC hashes
    the files' bytes. Both plan the same rules for a real edit, and nothing for an unrelated one."""
    project = reproduced
    assert "Nothing to be done" in sh(project, "snakemake", "--cores", "2", "--dry-run").stdout
    assert dvc_changed(project) == set()
    src = project / "src/latent_inpaint"
    sampling = {"evaluate", "ablation", "report", "all"}
    upstream_of_vqgan = {"default_data", "prepare", "masks"}

    # A real change to the sampler: sampling, evaluation and the report; no training.
    original = edit(src / "sampler.py", None, "\nEDITED_FOR_THE_TEST = True\n")
    assert planned(project) == sampling
    assert dvc_changed(project) == {"evaluate", "report", "ablation"}
    (src / "sampler.py").write_text(original)

    # A real change to the VQGAN: every rule from the VQGAN on, none before it.
    original = edit(src / "vqgan.py", None, "\nEDITED_FOR_THE_TEST = True\n")
    everything = planned(project)
    assert everything == {"vqgan", "tokens", "encoder", "transformer", "decoder", *sampling}
    assert not everything & upstream_of_vqgan
    assert dvc_changed(project) == {"vqgan", "tokens", "encoder", "transformer", "decoder", "evaluate", "report",
                                    "ablation"}

    # Comments and docstrings only: Snakemake reruns nothing. DVC sees new bytes in the same
    # stages; its repro calls Snakemake, which writes nothing, and DVC records the new hashes.
    (src / "vqgan.py").write_text(original)
    edit(src / "vqgan.py", '"""', '"""A docstring edited for the test. ')
    edit(src / "vqgan.py", None, "\n# a comment added for the test\n")
    assert "Nothing to be done" in sh(project, "snakemake", "--cores", "2", "--dry-run").stdout
    weights = digests(project, "runs")
    sh(project, "dvc", "repro")
    assert digests(project, "runs") == weights
    assert dvc_changed(project) == set()

    # Code no rule runs (the CLI is wiring around the entry modules): nothing, for both.
    edit(src / "cli.py", None, "\nEDITED_FOR_THE_TEST = True\n")
    assert "Nothing to be done" in sh(project, "snakemake", "--cores", "2", "--dry-run").stdout
    assert dvc_changed(project) == set()


def test_dvc_plots_and_metrics_show_every_curve_and_result(reproduced, tmp_path):
    """`dvc plots show` draws each training run's curves and the evaluation's and ablations'
    numbers; `dvc metrics` reads every metrics file, so `dvc metrics diff` compares them."""
    project = reproduced
    declared = yaml.safe_load((project / "dvc.yaml").read_text())
    curves = [(path, spec) for plot in declared["plots"] for path, spec in plot.items() if path.endswith("curves.json")]
    assert {path.split("/")[1] for path, _ in curves} == {"vqgan", "encoder", "transformer", "decoder"}
    for path, spec in curves:  # the fields dvc.yaml names are in every record the run wrote
        records = json.loads((project / path).read_text())
        assert records and all({spec["x"], *spec["y"]} <= set(r) and r[spec["y"][0]] is not None for r in records)

    page = sh(project, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    assert "WARNING" not in page.stdout and "ERROR" not in page.stdout, page.stdout
    html = (tmp_path / "plots/index.html").read_text()
    for path, spec in curves:
        first = json.loads((project / path).read_text())[0]
        assert all(f'"{field}": {first[field]}' in html for field in spec["y"]), (path, spec["y"])
    for name in ("ours, box", "biharmonic (classical), small", *TINY["evaluate"]["ablations"]):
        assert f'"{name}"' in html, name

    shown = json.loads(sh(project, "dvc", "metrics", "show", "--json").stdout)
    files = {f for rev in shown.values() for f in rev["data"]}
    assert files >= {"results/metrics.json", "data/tokens/metrics.json",
                     *(f"runs/{s}/metrics.json" for s in ("vqgan", "encoder", "transformer", "decoder")),
                     *(f"results/ablations/{v}.json" for v in TINY["evaluate"]["ablations"])}, files

    if sh(project, "git", "rev-parse", "--verify", "-q", "HEAD", ok=False).returncode:  # run alone: commit here
        sh(project, "git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "add", "-A")
        sh(project, "git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "run")
    ablation = project / "results/ablations/full.json"
    recorded = ablation.read_bytes()
    result = json.loads(recorded)
    (method,) = [m for m, r in result.items() if isinstance(r, dict) and "box" in r]
    result[method]["box"]["fid"] += 1.0
    ablation.write_text(json.dumps(result))
    try:
        diff = json.loads(sh(project, "dvc", "metrics", "diff", "--json").stdout)
    finally:
        ablation.write_bytes(recorded)
    assert diff["results/ablations/full.json"][f"{method}.box.fid"]["diff"] == pytest.approx(1.0)


def snakemake_report(project: Path, out: Path) -> dict[str, str]:
    """`snakemake --report` of a finished project: the results it lists, path -> caption."""
    sh(project, "snakemake", "--report", str(out))
    html = out.read_text()
    entry = r'"([^"]+)": \{"name": "[^"]+", "filename"(?:[^{}]|\{[^{}]*\})*?'  # labels are a {...} of their own
    return dict(re.findall(entry + r'"caption": "((?:[^"\\]|\\.)*)"', html))


def test_snakemake_report_lists_the_results_with_captions(reproduced, tmp_path):
    results = snakemake_report(reproduced, tmp_path / "report.html")
    expected = {"results/report.md", "results/samples.png", "results/curves.png", "results/table1.md",
                "results/metrics.json", "data/masks/masks.png",
                *(f"results/ablations/{v}.json" for v in TINY["evaluate"]["ablations"])}
    assert set(results) == expected, results.keys()
    assert all(caption.startswith("<p>") for caption in results.values())
    # One job writes every ablation: each file's label names its variant.
    html = (tmp_path / "report.html").read_text()
    for v in TINY["evaluate"]["ablations"]:
        assert f'"results/ablations/{v}.json": {{"name": "{v}.json", "filename": "{v}.json", ' \
               f'"labels": {{"variant": "{v}"}}' in html


def test_snakemake_report_in_a_browser(reproduced, tmp_path):
    """The report's page in headless Chromium: a picture, not a blank page, whose menu lists the
    results' categories."""
    from browser import assert_not_blank, browser, render

    browser()
    report = tmp_path / "report.html"
    snakemake_report(reproduced, report)
    dom = render(report, tmp_path / "report.png", wait_ms=5000)
    assert_not_blank(tmp_path / "report.png")
    dom = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)
    text = " ".join(re.sub(r"<[^>]+>", " ", dom).split())
    assert all(category in text for category in ("Evaluation masks", "Evaluation", "Ablations", "Report")), text[:2000]
