"""MLflow nested runs: a parent run per pipeline invocation, a child run per stage, in one or
several processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latent_inpaint import tracking
from latent_inpaint.config import TrackingConfig


def _cfg(**kw) -> TrackingConfig:
    return TrackingConfig(**{"enabled": True, "uri": None, "experiment": "test", "log_images": True, **kw})


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
from latent_inpaint import tracking
from latent_inpaint.config import TrackingConfig
stage = sys.argv[1]
cfg = TrackingConfig(enabled=True, uri=None, experiment="test", log_images=True)
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
        "cfg = TrackingConfig(enabled=False, uri=None, experiment='x', log_images=True)\n"
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
    argv = tracking.ui_command(_cfg(), workdir, port=5123)
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{workdir / 'mlflow.db'}"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "5123"
    assert argv[argv.index("--workers") + 1] == "1"
    assert tracking.UI_ENV == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
