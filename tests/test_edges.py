"""A demanding user's edge cases (issue 14): each test reproduces one reported failure.

Bad options and parameters fail before any model loads or any file is written, naming the
option or key, the value and what is allowed, with exit code 2 (CLI and Snakemake alike).
Outputs cannot clobber each other or go stale; huge images stay in bounded memory; alpha is
kept; killed processes (real signals to real processes) leave nothing half-made or orphaned;
deleting any artifact a rule makes reruns that rule and only what follows it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO, params, venv_bin
from latent_inpaint.cli import main
from latent_inpaint.config import ConfigError, SampleConfig, section, validate
from latent_inpaint.params import load_params
from latent_inpaint.data import ingest
from latent_inpaint.inpaint import Inpainter
from latent_inpaint.stages.inpaint import GRID_TILE, inpaint_files
from test_inpaint import SIZE, photo, runs  # noqa: F401  (runs: the module's fixture of saved parts)

ENV = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PATH": venv_bin()}
GIVEN = ["--params", str(REPO / "params.yaml"), "--set", f"data.size={SIZE}", "--set", "tracking.enabled=false"]


def cli(capsys, *args: str) -> tuple[int, str]:
    """`latent-inpaint ARGS` in this process: exit code and stderr."""
    try:
        code = main([*args])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------- 1-3: options


@pytest.mark.parametrize("option, value, says", [
    ("--samples", "0", "argument --samples: must be at least 1, got 0"),
    ("--samples", "-1", "argument --samples: must be at least 1, got -1"),
    ("--steps", "0", "argument --steps: must be at least 1, got 0"),
    ("--temperature", "0", "argument --temperature: must be a finite number > 0, got 0"),
    ("--anneal", "nan", "argument --anneal: must be a finite number > 0, got nan"),
    ("--seed", str(2**63), f"argument --seed: must be below 2**63 = {2**63} (a 64-bit generator seed), got {2**63}"),
    ("--seed", str(2**64), "argument --seed: must be below 2**63"),
    ("--seed", str(2**63 - 2), f"--seed must lie in [0, 2**63 - samples] = [0, {2**63 - 4}]"),  # 4 samples: seed + 3
    ("--device", "gpu0", "--device 'gpu0' is not a device: use cpu, cuda, cuda:N"),
    ("--device", "cuda:99", "--device cuda:99: "),
    ("--mask", "nowhere.png", "--mask nowhere.png: no such file or folder; use a mask file, a folder of masks"),
])
def test_inpaint_options_fail_before_the_model_loads_naming_option_value_and_rule(capsys, tmp_path, option, value,
                                                                                  says):
    """Before: --samples 0 / --steps 0 became the defaults, --samples -1 gave "0 samples", seed
    2**63 drew seed 0's samples, 2**64 overflowed unnamed, a missing GPU blamed the weights."""
    Image.fromarray(photo(40, 40)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    code, err = cli(capsys, "inpaint", str(tmp_path / "a.png"), option, value, "--runs", str(tmp_path / "no_runs"),
                    "--out", str(out), *GIVEN)
    assert code == 2 and says in err, err
    assert "config.json is missing" not in err and not out.exists()  # no model loaded, nothing written


def test_a_missing_gpu_is_named_as_the_device_option(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, err = cli(capsys, "inpaint", str(tmp_path), "--device", "cuda", "--runs", str(tmp_path), *GIVEN)
    assert code == 2 and "--device cuda: no CUDA GPU is visible on this machine" in err and "safetensors" not in err


def test_empty_or_missing_input_is_an_error_and_writes_nothing(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    code, err = cli(capsys, "inpaint", str(tmp_path / "empty"), "--out", str(tmp_path / "o1"), *GIVEN)
    assert code == 2 and f"input folder {tmp_path / 'empty'} holds no image file (" in err
    code, err = cli(capsys, "inpaint", str(tmp_path / "nothing.jpg"), "--out", str(tmp_path / "o2"), *GIVEN)
    assert code == 2 and f"input {tmp_path / 'nothing.jpg'}: no such file or folder" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------------- 4-6: outputs


def test_outputs_cannot_clobber_go_stale_or_outlive_a_failure(runs, tmp_path):  # noqa: F811
    """Before: a.png and a.jpg shared out/a/; fewer samples left old sample_XX.png behind."""
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    Image.fromarray(photo(40, 40, seed=1)).save(images / "a.png")
    Image.fromarray(photo(40, 40, seed=2)).save(images / "a.jpg", quality=95)
    model, masks = Inpainter.from_runs(runs, "cpu"), section(params(), "masks")
    cfg = SampleConfig(steps=2, temperature=1.0, anneal=0.9, samples=3, seed=0, sampler="ours",
                       batch_size=8, precision="auto")
    inpaint_files(model, images, out, cfg, masks)
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "a.png", "settings.json"]
    for name in ("a.png", "a.jpg"):  # each folder holds its own image's samples
        own = np.asarray(Image.open(images / name).convert("RGB"))
        sample = np.asarray(Image.open(out / name / "sample_00.png"))
        assert np.array_equal(sample[:2], own[:2])  # the box leaves the top rows visible
    report = inpaint_files(model, images, out, SampleConfig(2, 1.0, 0.9, 1, 0, "ours", 8, "auto"), masks)
    assert sorted(p.name for p in (out / "a.png").iterdir()) == ["grid.png", "sample_00.png"]  # replaced whole
    assert report["complete"] and "photo.jpg -> photo.jpg/" in report["settings"]["folders"]
    (images / "a.jpg").write_text("now broken")
    report = inpaint_files(model, images, out, SampleConfig(2, 1.0, 0.9, 1, 0, "ours", 8, "auto"), masks)
    assert report["images"][str(images / "a.jpg")]["status"] == "failed"
    assert not (out / "a.jpg").exists()  # the earlier results would pass for this run's
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left


def test_huge_landscape_image_bounded_memory_sane_grid_and_a_box_with_margins(runs, tmp_path):  # noqa: F811
    """Before: 6000x4000 took 4.6 GB and wrote a 144-megapixel grid.png; the landscape box
    covered the full height."""
    h, w = 4000, 6000
    rng = np.random.default_rng(0)
    big = np.repeat(np.repeat(rng.integers(0, 256, (h // 40, w // 40, 3), dtype=np.uint8), 40, 0), 40, 1)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    script = f"""
import json, resource, sys, time
from pathlib import Path
from latent_inpaint.config import SampleConfig, section
from latent_inpaint.params import load_params
from latent_inpaint.inpaint import Inpainter
from latent_inpaint.stages.inpaint import inpaint_files
model = Inpainter.from_runs(Path({str(runs)!r}), "cpu")
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
inpaint_files(model, Path({str(tmp_path / 'big.jpg')!r}), Path({str(tmp_path / 'out')!r}),
              SampleConfig(steps=2, temperature=1.0, anneal=0.9, samples=2, seed=0, sampler="ours",
                       batch_size=8, precision="auto"),
              section(load_params([{str(REPO / 'params.yaml')!r}]), "masks"))
print(json.dumps({{"seconds": time.perf_counter() - start,
                   "growth_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - loaded}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, check=False)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.splitlines()[-1])
    print("6000x4000, 2 samples:", measured)
    assert measured["growth_mb"] < 1000  # 72 MB per full-size RGB array: a few of them, all uint8 (before: ~4 GB)
    folder = tmp_path / "out" / "big.jpg"
    with Image.open(folder / "grid.png") as g:
        assert g.size[0] <= 4 * (GRID_TILE + 2) + 2 and g.size[1] <= GRID_TILE + 4
    sample = np.asarray(Image.open(folder / "sample_00.png"))
    original = np.asarray(Image.open(tmp_path / "big.jpg"))
    assert sample.shape == (h, w, 3)
    rows, cols = np.nonzero(np.any(sample != original, axis=2))
    assert rows.min() >= 400 and rows.max() < 3600 and cols.min() >= 600 and cols.max() < 5400  # 0.8 x each side
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())["settings"]
    assert "0.8 of the height by 0.8 of the width" in settings["box"]


def test_alpha_is_kept_in_the_samples_and_said(runs, tmp_path):  # noqa: F811
    """Before: RGBA was composited on white and the alpha dropped without a note."""
    rgb = photo(40, 48)
    alpha = np.tile(np.linspace(0, 255, 48).astype(np.uint8), (40, 1))
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "cut.png")
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    report = inpaint_files(Inpainter.from_runs(runs, "cpu"), tmp_path, tmp_path / "out",
                           SampleConfig(2, 1.0, 0.9, 2, 0, "ours", 8, "auto"), section(params(), "masks"))
    with Image.open(tmp_path / "out" / "cut.png" / "sample_01.png") as im:
        assert im.mode == "RGBA" and np.array_equal(np.asarray(im)[..., 3], alpha)
    with Image.open(tmp_path / "out" / "plain.png" / "sample_00.png") as im:
        assert im.mode == "RGB"
    cut = report["images"][str(tmp_path / "cut.png")]
    assert cut["alpha"] and any("composited on white for the model" in n for n in cut["notes"])
    assert "keeps the input's alpha channel" in report["settings"]["alpha"]
    assert not report["images"][str(tmp_path / "plain.png")]["alpha"]


# ---------------------------------------------------------------------------------- 7-8: kills


def _wait_for(predicate, timeout: float, poll: float = 0.005) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll)
    return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed meanwhile
        return 0


TRACK = """
import sys
from latent_inpaint.params import load_params
from latent_inpaint.tracking import stage_run, tracking_config
with stage_run("probe", tracking_config(load_params([sys.argv[1]])), {"data": {"size": 1}}, workdir=sys.argv[2]) as t:
    t.log_metrics({"m": 1.0})
"""


def test_a_store_creation_killed_by_sigkill_is_rebuilt_on_the_next_run(tmp_path):
    """Before: a SIGKILL during the first run's migrations left mlflow.db half-built, and every
    later run failed ("index ... already exists") until it was deleted by hand."""
    args = [sys.executable, "-c", TRACK, str(REPO / "params.yaml"), str(tmp_path)]
    first = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    begun = _wait_for(lambda: any(_size(p) > 0 for p in tmp_path.glob("*mlflow.db*")), 120)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert begun, "the store's creation never began"
    again = subprocess.run(args, env=ENV, capture_output=True, text=True, check=False, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "mlflow.db").is_file() and not list(tmp_path.glob(".mlflow.db.creating-*"))


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def many_images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(160):
        Image.fromarray(rng.integers(0, 256, (192, 192, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg", quality=90)
    return folder


def _start_prepare(source: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "latent_inpaint.cli", "prepare", "--quiet", "--source", str(source), "--out",
           str(out), *GIVEN, "--set", "data.workers=2", "--set", "data.shard_size=2", "--set", "data.image_format=png"]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_prepare_workers_die_with_their_parent(many_images, tmp_path, sig):
    """Before: SIGKILL or SIGTERM to prepare left its workers writing, then hanging forever
    (alive after 70 s); SIGTERM printed nothing."""
    out = tmp_path / "shards"
    parent = _start_prepare(many_images, out)
    workers: set[int] = set()

    def started() -> bool:
        workers.update(_children(parent.pid))
        return len(workers) >= 2

    assert _wait_for(started, 120, 0.02), parent.communicate()[1][-2000:]
    parent.send_signal(sig)
    _, err = parent.communicate(timeout=60)
    stopped = time.monotonic()
    assert _wait_for(lambda: not any(_alive(pid) for pid in workers), 5, 0.05), "a worker outlived prepare by 5 s"
    print(f"{signal.Signals(sig).name}: workers gone {time.monotonic() - stopped:.2f} s after prepare")
    assert not (out / "manifest.json").exists()
    if sig == signal.SIGTERM:
        assert parent.returncode == 128 + signal.SIGTERM
        assert "stopped by signal 15" in err and "shards are complete and kept in" in err and "rerun to resume" in err
        kept = len(list(out.glob("*/*.json")))
        cfg = section(load_params([REPO / "params.yaml"], [f"data.size={SIZE}", "data.shard_size=2",
                                                             "data.image_format=png"]), "data")
        manifest = ingest.prepare(cfg, many_images, out, progress=False)  # resumes: finished shards stay
        assert manifest["resumed_shards"] >= kept and manifest["written"] == 160


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_inpaint_leaves_no_half_results(runs, tmp_path, sig):  # noqa: F811
    """A kill while an image's samples are being written leaves no visible half folder; SIGTERM
    removes its hidden one too and says so; the next run clears a SIGKILL's leftover."""
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    Image.fromarray(photo(1500, 2000)).save(images / "wide.png")
    cmd = [sys.executable, "-m", "latent_inpaint.cli", "inpaint", str(images), "--runs", str(runs), "--out", str(out),
           "--samples", "8", "--steps", "1", "--device", "cpu", *GIVEN]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: out.is_dir() and any(p.name.startswith(".wide.png.") for p in out.iterdir()), 180), \
        proc.communicate()[1][-2000:]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not (out / "wide.png").exists()  # the image's folder appears whole or not at all
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM and "stopped by signal 15" in err
        assert not [p for p in out.iterdir() if p.name.startswith(".") and p.is_dir()]
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=False, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["settings.json", "wide.png"]
    assert len(list((out / "wide.png").glob("sample_*.png"))) == 8


# ---------------------------------------------------------------------------------- 10: parameters


@pytest.mark.parametrize("assignment, says", [
    ("data.size=60", "data.size must be a multiple of the VQGAN factor 8"),
    ("transformer.n_head=3", "transformer.n_head must divide transformer.n_embd, got n_head 3 and n_embd 64"),
    ("encoder.lr=-1", "encoder.lr must be positive, got -1.0"),
    ("vqgan.base_lr=0", "vqgan.base_lr must be positive, got 0.0"),
    ("sample.samples=-1", "sample.samples must be positive, got -1"),
    ("sample.steps=0", "sample.steps must be positive, got 0"),
    ("sample.temperature=0", "sample.temperature must be positive, got 0.0"),
    ("data.jpeg_quality=101", "data.jpeg_quality must be between 1 and 100, got 101"),
    ("masks.box_fraction=1.5", "masks.box_fraction must lie in (0, 1], got 1.5"),
])
def test_bad_parameters_fail_validation_naming_key_value_and_rule(assignment, says):
    """Before: these passed validation and failed late inside jobs (or never)."""
    with pytest.raises(ConfigError, match=f"^{re.escape(says)}"):
        validate(load_params([REPO / "params.yaml"], [assignment]))


def test_every_command_checks_all_params_before_writing(capsys, tmp_path):
    """Before: subcommands ignored unknown keys outside their sections, prepare re-sharded
    before data.size failed, and a YAML error had no line number."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["evaluate"]["fid_imags"] = 5  # a section default-data never reads
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(p))
    out = tmp_path / "default"
    code, err = cli(capsys, "default-data", "--params", str(tmp_path / "typo.yaml"), "--out", str(out))
    assert code == 2 and "unknown key(s) in evaluate: fid_imags" in err and not out.exists()
    Image.fromarray(photo(40, 40)).save(tmp_path / "a.png")
    code, err = cli(capsys, "prepare", "--source", str(tmp_path), "--out", str(tmp_path / "shards"),
                    "--params", str(REPO / "params.yaml"), "--set", "data.size=60")
    assert code == 2 and "data.size must be a multiple of the VQGAN factor 8" in err
    assert not (tmp_path / "shards").exists()
    (tmp_path / "broken.yaml").write_text("data:\n  size: 64\n  workers: [2\nmasks: {}\n")
    code, err = cli(capsys, "masks", "--params", str(tmp_path / "broken.yaml"))
    assert code == 2 and "broken.yaml is not valid YAML (line 4, column 6): expected ',' or ']'" in err


# ---------------------------------------------------------------------------------- 9: the DAG


@pytest.mark.slow
def test_deleting_any_artifact_reruns_the_rule_that_makes_it_and_what_follows(tmp_path):
    """Before: deleting the decoder's weights or results/curves.png left Snakemake with
    "Nothing to be done". Also: a parameter error stops Snakemake with the CLI's exit code 2."""
    from test_workflow import make_project, planned, sh

    project = make_project(tmp_path / "project")
    bad = sh(project, "snakemake", "--cores", "1", "--dry-run", "--config", "transformer={n_head: 3}", ok=False)
    assert bad.returncode == 2 and "transformer.n_head must divide transformer.n_embd" in bad.stdout
    sh(project, "snakemake", "--cores", "2")
    after = {"evaluate", "ablation", "report", "all"}
    cases = {
        "runs/decoder/final/decoder.safetensors": {"decoder", *after},
        "runs/decoder/final/disc.safetensors": {"decoder", *after},
        "runs/transformer/final/transformer.safetensors": {"transformer", *after},
        "runs/encoder/final/encoder.safetensors": {"encoder", *after},  # the decoder does not read it
        "runs/vqgan/final/vqgan.safetensors": {"vqgan", "tokens", "encoder", "transformer", "decoder", *after},
        "data/tokens/val.npy": {"tokens", "encoder", "transformer", "decoder", *after},
        "results/curves.png": {"report", "all"},
        "results/table1.md": {"evaluate", "report", "all"},
    }
    for path, rules in cases.items():
        kept, stamp = (project / path).read_bytes(), (project / path).stat()
        (project / path).unlink()
        assert planned(project) == rules, path
        (project / path).write_bytes(kept)  # back as it was: the next case starts from a finished run
        os.utime(project / path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
