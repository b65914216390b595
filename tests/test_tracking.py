"""MLflow nested runs: a parent run per pipeline invocation, a child run per stage, in one or
several processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from latent_inpaint import mlflow_store, tracking
from latent_inpaint.config import TrackingConfig
from latent_inpaint.stages import report
from latent_inpaint.usage import UsageError


def _cfg(**kw) -> TrackingConfig:
    defaults = {"enabled": True, "uri": None, "experiment": "test", "log_images": True, "log_models": False}
    return TrackingConfig(**{**defaults, **kw})


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.INVOCATION_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, experiment: str = "test"):
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _families(uri: str) -> dict:
    """{parent id: (parent run, {stage: [its child runs, oldest first]})} over the experiment."""
    runs = sorted(_runs(uri), key=lambda r: r.info.start_time)
    families = {r.info.run_id: (r, {}) for r in runs if tracking.PARENT_TAG not in r.data.tags}
    for run in runs:
        if tracking.PARENT_TAG in run.data.tags:  # a child of a parent not listed is a KeyError
            families[run.data.tags[tracking.PARENT_TAG]][1].setdefault(run.info.run_name, []).append(run)
    return families


def _artifacts(uri: str, run_id: str, path: str = "") -> list[str]:
    return sorted(f.path for f in _client(uri).list_artifacts(run_id, path))


def test_an_invocation_is_a_parent_run_with_a_child_per_stage(workdir, monkeypatch):
    monkeypatch.setenv(tracking.INVOCATION_ENV, "0123456789abcdef")
    uri = tracking.resolve_uri(_cfg(), workdir)
    data = {"size": 64, "splits": ("val", "test")}
    png = workdir / "grid.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(png)

    with tracking.stage_run("data", _cfg(), {"data": data}) as t:
        t.log_metrics({"images": 120.0})
        t.log_image(np.zeros((8, 8, 3), np.uint8), "preview")
        t.log_dict({"count": 120}, "manifest")
        data_id = t.run_id
    with tracking.stage_run("vqgan", _cfg(), {"data": data, "vqgan": {"steps": 3, "lr": 1e-4}}) as t:
        (parent, _), = _families(uri).values()
        assert parent.info.status == "RUNNING"  # while a stage runs
        for step, loss in enumerate([3.0, 2.0, 1.0]):
            t.log_metrics({"loss": loss}, step=step)
        t.log_image(png, "samples/grid.png")
        t.log_image(Image.new("L", (8, 8)), "mask")
        t.log_artifact(png, "files")
        vqgan_id = t.run_id

    assert uri == f"sqlite:///{workdir / 'mlflow.db'}" and (workdir / "mlflow.db").is_file()
    (parent, children), = _families(uri).values()
    assert re.fullmatch(r"pipeline-\d{8}-\d{6}-01234567", parent.info.run_name)
    assert parent.data.tags[tracking.INVOCATION_TAG] == "0123456789abcdef"
    assert parent.info.status == "FINISHED" and parent.info.end_time
    assert parent.data.params == {} and parent.data.metrics == {}
    assert {s: [c.info.run_id for c in runs] for s, runs in children.items()} == {
        "data": [data_id], "vqgan": [vqgan_id]
    }  # fmt: skip
    (data_run,), (vqgan_run,) = children["data"], children["vqgan"]
    assert data_run.info.status == vqgan_run.info.status == "FINISHED"

    assert data_run.data.params == {"data.size": "64", "data.splits": '["val", "test"]'}
    assert vqgan_run.data.params == {**data_run.data.params, "vqgan.steps": "3", "vqgan.lr": "0.0001"}
    assert data_run.data.metrics == {"images": 120.0}  # no stage prefix: the run is the stage
    assert vqgan_run.data.metrics == {"loss": 1.0}
    history = _client(uri).get_metric_history(vqgan_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 3.0), (1, 2.0), (2, 1.0)]

    assert vqgan_run.info.artifact_uri.startswith((workdir / "mlruns").as_uri())
    assert _artifacts(uri, parent.info.run_id) == []
    assert _artifacts(uri, data_id) == ["manifest.json", "preview.png"]
    assert _artifacts(uri, vqgan_id) == ["files", "mask.png", "samples"]
    assert _artifacts(uri, vqgan_id, "samples") == ["samples/grid.png"]
    assert _artifacts(uri, vqgan_id, "files") == ["files/grid.png"]
    local = _client(uri).download_artifacts(vqgan_id, "samples/grid.png", str(workdir / "dl"))
    assert Path(local).read_bytes() == png.read_bytes()
    with Image.open(_client(uri).download_artifacts(data_id, "preview.png", str(workdir / "dl"))) as img:
        assert img.size == (8, 8) and img.mode == "RGB"


_JOB = """
import sys
from latent_inpaint import mlflow_store, tracking
from latent_inpaint.config import TrackingConfig
stage = sys.argv[1]
cfg = TrackingConfig(enabled=True, uri=None, experiment="test", log_images=True, log_models=False)
with tracking.stage_run(stage, cfg, {"data": {"size": 64}, stage: {"steps": 2}}) as t:
    for step in range(5):
        t.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
"""


def test_parallel_processes_of_one_invocation_share_one_parent(workdir):
    env = {**os.environ, tracking.INVOCATION_ENV: "feedfacecafe"}  # the fixture cleared the rest
    stages = ["vqgan", "encoder", "transformer"]
    jobs = [
        subprocess.Popen([sys.executable, "-c", _JOB, s], cwd=workdir, env=env, stderr=subprocess.PIPE)
        for s in stages
    ]
    for job in jobs:
        _, err = job.communicate(timeout=120)
        assert job.returncode == 0, err.decode()

    (parent, children), = _families(tracking.resolve_uri(_cfg(), workdir)).values()
    assert parent.data.tags[tracking.INVOCATION_TAG] == "feedfacecafe"
    assert parent.info.status == "FINISHED"
    assert sorted(children) == sorted(stages)
    for s in stages:
        (child,) = children[s]
        assert child.info.status == "FINISHED"
        assert child.data.params == {"data.size": "64", f"{s}.steps": "2"}
        assert child.data.metrics == {"loss": pytest.approx(0.2)}


def test_without_invocation_each_call_gets_its_own_parent(workdir):
    for _ in range(2):
        with tracking.stage_run("data", _cfg(), {"data": {"size": 64}}):
            pass
    families = _families(tracking.resolve_uri(_cfg(), workdir))
    assert len(families) == 2
    assert len({parent.data.tags[tracking.INVOCATION_TAG] for parent, _ in families.values()}) == 2
    assert all(list(children) == ["data"] for _, children in families.values())
    assert tracking.INVOCATION_ENV not in os.environ


def test_a_failing_stage_fails_its_child_and_the_parent_until_a_retry_succeeds(workdir, monkeypatch):
    monkeypatch.setenv(tracking.INVOCATION_ENV, "abc123")
    uri = tracking.resolve_uri(_cfg(), workdir)
    with tracking.stage_run("data", _cfg(), {"data": {"size": 64}}):
        pass
    with pytest.raises(ZeroDivisionError):
        with tracking.stage_run("decoder", _cfg(log_images=False), {"decoder": {"lr": 0.1}}) as t:
            t.log_image(np.zeros((4, 4, 3), np.uint8), "never")
            1 / 0
    (parent, children), = _families(uri).values()
    assert parent.info.status == "FAILED"
    assert [c.info.status for c in children["data"]] == ["FINISHED"]
    (failed,) = children["decoder"]
    assert failed.info.status == "FAILED" and failed.data.params == {"decoder.lr": "0.1"}
    assert _artifacts(uri, failed.info.run_id) == []

    # A failure elsewhere keeps the parent failed while a later stage runs and after it ends.
    with tracking.stage_run("masks", _cfg(), {}):
        assert _client(uri).get_run(parent.info.run_id).info.status == "FAILED"
    assert _client(uri).get_run(parent.info.run_id).info.status == "FAILED"

    # A retried stage (a requeued SLURM job, a rerun after the crash) counts by its latest attempt.
    with tracking.stage_run("decoder", _cfg(), {"decoder": {"lr": 0.1}}):
        pass
    (parent, children), = _families(uri).values()
    assert [c.info.status for c in children["decoder"]] == ["FAILED", "FINISHED"]
    assert parent.info.status == "FINISHED"


def test_large_batches_are_split_into_mlflow_sized_ones(workdir):
    params = {"big": {f"p{i:03d}": i for i in range(250)}}
    with tracking.stage_run("data", _cfg(), params) as t:
        t.log_metrics({f"m{i:04d}": float(i) for i in range(2500)}, step=3)
    (_, children), = _families(tracking.resolve_uri(_cfg(), workdir)).values()
    (child,) = children["data"]
    assert child.data.params == {f"big.p{i:03d}": str(i) for i in range(250)}
    assert child.data.metrics == {f"m{i:04d}": float(i) for i in range(2500)}


def test_uri_precedence(workdir, monkeypatch):
    assert tracking.resolve_uri(_cfg(), workdir) == f"sqlite:///{workdir / 'mlflow.db'}"
    other = f"sqlite:///{workdir / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert tracking.resolve_uri(_cfg(), workdir) == other
    assert tracking.resolve_uri(_cfg(uri="sqlite:///params.db"), workdir) == "sqlite:///params.db"

    with tracking.stage_run("data", _cfg(), {"data": {"size": 64}}) as t:
        t.log_metrics({"x": 1.0})
    assert (workdir / "other.db").is_file() and not (workdir / "mlflow.db").exists()
    assert len(_runs(other)) == 2  # a parent and its child


def test_disabled_tracking_writes_nothing(workdir):
    with tracking.stage_run("data", _cfg(enabled=False), {"data": {"size": 64}}) as t:
        t.log_metrics({"x": 1.0}, step=1)
        t.log_image(np.zeros((4, 4), np.uint8), "img")
        t.log_dict({"a": 1}, "d")
        t.log_artifact(workdir / "missing.txt")
        assert not t.enabled and t.run_id is None
    assert list(workdir.iterdir()) == []


def test_import_and_disabled_stage_do_not_import_mlflow(workdir):
    code = (
        "import sys\n"
        "from latent_inpaint import tracking\n"
        "from latent_inpaint.config import TrackingConfig\n"
        "cfg = TrackingConfig(enabled=False, uri=None, experiment='x', log_images=True, log_models=False)\n"
        "with tracking.stage_run('data', cfg, {}):\n"
        "    pass\n"
        "assert 'mlflow' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=workdir, check=True)


def test_unusable_store_names_uri_and_fix(workdir):
    expected = r"(?s)'bogus://nowhere'.*tracking\.uri.*MLFLOW_TRACKING_URI"
    with pytest.raises(RuntimeError, match=expected) as info:
        with tracking.stage_run("data", _cfg(uri="bogus://nowhere"), {}):
            pass
    assert "tracking.enabled: false" in str(info.value)


def test_ui_command(workdir):
    argv = mlflow_store.ui_command(_cfg(), workdir, port=5123)
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{workdir / 'mlflow.db'}"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "5123"
    assert argv[argv.index("--workers") + 1] == "1"
    assert mlflow_store.UI_ENV == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    """One migrated SQLite store with nothing in it: building one takes seconds, a copy none."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    _client(f"sqlite:///{db}").search_experiments(max_results=1)
    return db


@pytest.fixture
def seed(_empty_store):
    """seed(folder, name) puts an empty store at folder/name (default mlflow.db) and returns it."""
    def put(folder: Path, name: str = mlflow_store.EMBEDDED_DB) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store, folder / name)
        return folder / name

    return put


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_runs_carry_the_commit_and_the_experiment_is_model_training(workdir, seed):
    seed(workdir)
    uri = tracking.resolve_uri(_cfg(), workdir)
    with tracking.stage_run("data", _cfg(), {}) as t:
        child = t.run_id
    (parent, _), = _families(uri).values()
    commit = _git("rev-parse", "HEAD")
    dirty = "true" if _git("status", "--porcelain", "--untracked-files=no") else "false"
    for run in (parent, _client(uri).get_run(child)):  # the code's checkout, not the working directory's
        assert run.data.tags[tracking.GIT_COMMIT_TAG] == commit
        assert run.data.tags[tracking.GIT_DIRTY_TAG] == dirty
    exp = _client(uri).get_experiment_by_name("test")
    assert exp.tags[mlflow_store.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_an_existing_experiment_becomes_model_training_unless_its_kind_was_chosen(workdir, seed):
    seed(workdir)
    uri = tracking.resolve_uri(_cfg(), workdir)
    with tracking.stage_run("data", _cfg(), {}):
        pass
    client = _client(uri)
    client.delete_experiment_tag(client.get_experiment_by_name("test").experiment_id, mlflow_store.EXPERIMENT_KIND_TAG)
    other = client.create_experiment("chosen", tags={mlflow_store.EXPERIMENT_KIND_TAG: "genai_development"})
    assert mlflow_store.EXPERIMENT_KIND_TAG not in client.get_experiment_by_name("test").tags  # a store made before

    with tracking.stage_run("data", _cfg(), {}):
        pass
    with tracking.stage_run("data", _cfg(experiment="chosen"), {}):
        pass
    assert client.get_experiment_by_name("test").tags[mlflow_store.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(other).tags[mlflow_store.EXPERIMENT_KIND_TAG] == "genai_development"


def test_git_state_without_git_or_outside_a_checkout_is_unknown(tmp_path, monkeypatch):
    assert tracking.git_state(tmp_path) == ("unknown", "unknown")
    assert tracking.git_state(tmp_path, REPO)[0] == _git("rev-parse", "HEAD")  # the first checkout found
    monkeypatch.setenv("PATH", str(tmp_path))  # no git program at all
    assert tracking.git_state(REPO) == ("unknown", "unknown")
    assert report.commit(REPO) == "unknown (not a git checkout)"


@pytest.mark.parametrize("log_models", [False, True])
def test_weights_location_as_tags_and_the_weights_on_request(workdir, seed, log_models):
    seed(workdir)
    final = workdir / "runs" / "vqgan" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "model.safetensors").write_bytes(b"weights")
    uri = tracking.resolve_uri(_cfg(), workdir)
    with tracking.stage_run("vqgan", _cfg(log_models=log_models), {}) as t:
        t.log_weights(Path("runs/vqgan/final"))
    tags = _client(uri).get_run(t.run_id).data.tags
    assert tags[tracking.WEIGHTS_TAG] == str(final)
    assert tags[tracking.WEIGHTS_DVC_TAG] == "runs/vqgan/final"
    logged = _artifacts(uri, t.run_id, "weights/final") if log_models else []
    assert logged == (["weights/final/config.json", "weights/final/model.safetensors"] if log_models else [])
    assert _artifacts(uri, t.run_id) == (["weights"] if log_models else [])


def _results(folder: Path) -> tuple[Path, Path, list[Path]]:
    """A results/ folder as the evaluation and report stages leave it, masks/masks.png, an ablation."""
    results, masks = folder / "results", folder / "masks"
    (results / "plots").mkdir(parents=True)
    masks.mkdir()
    scores = {"fid": 12.5, "hole_psnr": 21.0, "ssim": 0.5}
    metrics = {"ours": {"box": scores, "large": scores}, "biharmonic": {"box": {"fid": 40.0}},
               "images": {"fid": 100}, "stand_in": ["inception"], "variant": "full"}
    (results / "metrics.json").write_text(json.dumps(metrics))
    (results / "metrics.md").write_text("| method | FID |\n")
    (results / "report.md").write_text("# report\n![samples](samples.png)\n")
    (results / "plots" / "evaluation.json").write_text("[]")
    for png in (results / "samples.png", results / "curves.png", masks / "masks.png"):
        Image.new("RGB", (8, 8), (0, 128, 255)).save(png)
    ablation = results / "ablations" / "no_refiner.json"
    ablation.parent.mkdir()
    ablation.write_text(json.dumps({"ours": {"box": {"fid": 14.0}}, "variant": "no_refiner"}))
    return results, masks, [ablation]


def test_report_logs_results_to_the_pipeline_run(workdir, seed, monkeypatch):
    seed(workdir)
    monkeypatch.setenv(tracking.INVOCATION_ENV, "feedfacecafe")
    uri = tracking.resolve_uri(_cfg(), workdir)
    with tracking.stage_run("evaluate_full", _cfg(), {}):
        pass
    results, masks, ablations = _results(workdir)
    with tracking.invocation_run(_cfg()) as t:
        report.log_results(t, results, masks, ablations)

    (parent, children), = _families(uri).values()
    assert t.run_id == parent.info.run_id and list(children) == ["evaluate_full"]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics == {
        "evaluate/ours/box/fid": 12.5, "evaluate/ours/box/hole_psnr": 21.0, "evaluate/ours/box/ssim": 0.5,
        "evaluate/ours/large/fid": 12.5, "evaluate/ours/large/hole_psnr": 21.0, "evaluate/ours/large/ssim": 0.5,
        "evaluate/biharmonic/box/fid": 40.0, "evaluate/images/fid": 100.0,
        "ablation/no_refiner/ours/box/fid": 14.0,
    }  # fmt: skip
    run_id = parent.info.run_id
    assert _artifacts(uri, run_id) == ["evaluation", "report"]
    assert _artifacts(uri, run_id, "report") == [f"report/{n}" for n in ("curves.png", "masks.png", "report.md",
                                                                          "samples.png")]
    assert _artifacts(uri, run_id, "evaluation") == ["evaluation/ablation", "evaluation/evaluate.json",
                                                     "evaluation/metrics.md", "evaluation/plots"]
    local = _client(uri).download_artifacts(run_id, "evaluation/evaluate.json", str(workdir / "dl"))
    assert json.loads(Path(local).read_text()) == json.loads((results / "metrics.json").read_text())


def test_a_moved_or_copied_project_reads_and_writes_its_own_artifacts(tmp_path, seed, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    old = tmp_path / "old"
    seed(old)
    note = old / "note.txt"
    note.write_text("logged before the move")
    with tracking.stage_run("data", _cfg(), {}, old) as t:
        t.log_artifact(note)
        first = t.run_id

    moved, copied = tmp_path / "moved", tmp_path / "copied"
    shutil.copytree(old, copied)
    old.rename(moved)
    for project in (moved, copied):
        with tracking.stage_run("data", _cfg(), {}, project) as t:
            t.log_artifact(project / "note.txt", "again")
        uri = tracking.resolve_uri(_cfg(), project)
        client = _client(uri)
        assert client.get_run(first).info.artifact_uri == (project / "mlruns" / first / "artifacts").as_uri()
        back = client.download_artifacts(first, "note.txt", str(tmp_path / f"dl-{project.name}"))
        assert Path(back).read_text() == "logged before the move"
        assert (project / "mlruns" / t.run_id / "artifacts" / "again" / "note.txt").is_file()
        exp = client.get_experiment_by_name("test")
        assert exp.artifact_location == (project / "mlruns").as_uri()
    assert not old.exists()  # nothing was written to the old folder
    assert sorted(p.name for p in (copied / "mlruns").iterdir() if p.is_dir()) != sorted(
        p.name for p in (moved / "mlruns").iterdir() if p.is_dir())  # each wrote its own new run


def test_repoint_leaves_other_locations_alone(tmp_path, seed):
    seed(tmp_path, "a.db")
    with tracking.stage_run("data", _cfg(uri=f"sqlite:///{tmp_path / 'a.db'}"), {}, tmp_path):
        pass
    client = _client(f"sqlite:///{tmp_path / 'a.db'}")
    elsewhere = client.create_experiment("elsewhere", artifact_location="file:///srv/artifacts/x")
    assert mlflow_store.repoint_artifacts(tmp_path / "a.db") == 0
    assert client.get_experiment(elsewhere).artifact_location == "file:///srv/artifacts/x"


def test_ui_refuses_a_store_that_does_not_exist(tmp_path, seed, monkeypatch, capsys):
    from latent_inpaint import cli

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    seed(project)
    elsewhere.mkdir()
    shutil.copyfile(REPO / "params.yaml", project / "params.yaml")
    with tracking.stage_run("data", _cfg(), {}, project):
        pass
    monkeypatch.chdir(elsewhere)

    assert cli.main(["mlflow-ui", "--params", str(project / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert str(elsewhere / "mlflow.db") in err and f"there is one at {project / 'mlflow.db'}" in err
    assert list(elsewhere.iterdir()) == []  # no empty store made
    with pytest.raises(UsageError, match="no MLflow store at"):
        mlflow_store.ui_url(_cfg(), elsewhere)


def test_ui_url_opens_the_runs_in_the_training_view(workdir, seed):
    seed(workdir)
    with tracking.stage_run("data", _cfg(), {}):
        pass
    client = _client(tracking.resolve_uri(_cfg(), workdir))
    exp = client.get_experiment_by_name("test")
    client.delete_experiment_tag(exp.experiment_id, mlflow_store.EXPERIMENT_KIND_TAG)
    url = mlflow_store.ui_url(_cfg(), workdir, port=5123)
    assert url == f"http://127.0.0.1:5123/#/experiments/{exp.experiment_id}?workflowType=machine_learning"
    assert client.get_experiment(exp.experiment_id).tags[mlflow_store.EXPERIMENT_KIND_TAG] == "custom_model_development"
    no_experiment = mlflow_store.ui_url(_cfg(experiment="none yet"), workdir, port=5123)
    assert no_experiment == "http://127.0.0.1:5123/#/experiments?workflowType=machine_learning"
    assert mlflow_store.ui_url(_cfg(uri="http://team.example:5000"), workdir, port=5123) == "http://127.0.0.1:5123/"
