"""One MLflow run per pipeline invocation, shared by stages in one or several processes."""

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


def _artifacts(uri: str, run_id: str, path: str) -> list[str]:
    return sorted(f.path for f in _client(uri).list_artifacts(run_id, path))


def test_stages_of_one_invocation_share_one_run(workdir, monkeypatch):
    monkeypatch.setenv(tracking.INVOCATION_ENV, "0123456789abcdef")
    data = {"size": 64, "splits": ("val", "test")}
    png = workdir / "grid.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(png)

    with tracking.stage_run("data", _cfg(), {"data": data}) as t:
        t.log_metrics({"images": 120.0})
        t.log_image(np.zeros((8, 8, 3), np.uint8), "preview")
        t.log_dict({"count": 120}, "manifest")
    with tracking.stage_run("vqgan", _cfg(), {"data": data, "vqgan": {"steps": 3, "lr": 1e-4}}) as t:
        for step, loss in enumerate([3.0, 2.0, 1.0]):
            t.log_metrics({"loss": loss}, step=step)
        t.log_image(png, "samples/grid.png")
        t.log_image(Image.new("L", (8, 8)), "mask")
        t.log_artifact(png, "files")

    uri = tracking.resolve_uri(_cfg(), workdir)
    assert uri == f"sqlite:///{workdir / 'mlflow.db'}" and (workdir / "mlflow.db").is_file()
    (run,) = _runs(uri)
    assert re.fullmatch(r"pipeline-\d{8}-\d{6}-01234567", run.info.run_name)
    assert run.info.status == "FINISHED"
    assert run.data.params == {
        "data.size": "64",
        "data.splits": '["val", "test"]',
        "vqgan.steps": "3",
        "vqgan.lr": "0.0001",
    }
    assert run.data.tags["latent_inpaint.stage.data"] == "done"
    assert run.data.tags["latent_inpaint.stage.vqgan"] == "done"
    assert run.data.metrics == {"data/images": 120.0, "vqgan/loss": 1.0}
    history = _client(uri).get_metric_history(run.info.run_id, "vqgan/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 3.0), (1, 2.0), (2, 1.0)]

    assert run.info.artifact_uri.startswith((workdir / "mlruns").as_uri())
    assert _artifacts(uri, run.info.run_id, "data") == ["data/manifest.json", "data/preview.png"]
    assert _artifacts(uri, run.info.run_id, "vqgan") == ["vqgan/files", "vqgan/mask.png", "vqgan/samples"]
    assert _artifacts(uri, run.info.run_id, "vqgan/samples") == ["vqgan/samples/grid.png"]
    local = _client(uri).download_artifacts(run.info.run_id, "vqgan/samples/grid.png", str(workdir / "dl"))
    assert Path(local).read_bytes() == png.read_bytes()


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


def test_parallel_processes_of_one_invocation_share_one_run(workdir):
    env = {**os.environ, tracking.INVOCATION_ENV: "feedfacecafe"}  # the fixture cleared the rest
    stages = ["vqgan", "encoder", "transformer"]
    jobs = [
        subprocess.Popen([sys.executable, "-c", _JOB, s], cwd=workdir, env=env, stderr=subprocess.PIPE)
        for s in stages
    ]
    for job in jobs:
        _, err = job.communicate(timeout=120)
        assert job.returncode == 0, err.decode()

    (run,) = _runs(tracking.resolve_uri(_cfg(), workdir))
    assert run.data.tags[tracking.INVOCATION_TAG] == "feedfacecafe"
    assert run.info.status == "FINISHED"
    for s in stages:
        assert run.data.tags[f"latent_inpaint.stage.{s}"] == "done"
        assert run.data.params[f"{s}.steps"] == "2"
        assert run.data.metrics[f"{s}/loss"] == pytest.approx(0.2)


def test_without_invocation_each_call_gets_its_own_run(workdir):
    for _ in range(2):
        with tracking.stage_run("data", _cfg(), {"data": {"size": 64}}):
            pass
    runs = _runs(tracking.resolve_uri(_cfg(), workdir))
    assert len(runs) == 2
    assert len({r.data.tags[tracking.INVOCATION_TAG] for r in runs}) == 2
    assert tracking.INVOCATION_ENV not in os.environ


def test_uri_precedence(workdir, monkeypatch):
    assert tracking.resolve_uri(_cfg(), workdir) == f"sqlite:///{workdir / 'mlflow.db'}"
    other = f"sqlite:///{workdir / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert tracking.resolve_uri(_cfg(), workdir) == other
    assert tracking.resolve_uri(_cfg(uri="sqlite:///params.db"), workdir) == "sqlite:///params.db"

    with tracking.stage_run("data", _cfg(), {"data": {"size": 64}}) as t:
        t.log_metrics({"x": 1.0})
    assert (workdir / "other.db").is_file() and not (workdir / "mlflow.db").exists()
    assert len(_runs(other)) == 1


def test_disabled_tracking_writes_nothing(workdir):
    with tracking.stage_run("data", _cfg(enabled=False), {"data": {"size": 64}}) as t:
        t.log_metrics({"x": 1.0}, step=1)
        t.log_image(np.zeros((4, 4), np.uint8), "img")
        t.log_dict({"a": 1}, "d")
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


def test_changed_param_in_same_run_is_a_clear_error(workdir, monkeypatch):
    monkeypatch.setenv(tracking.INVOCATION_ENV, "abc123")
    with tracking.stage_run("data", _cfg(), {"data": {"size": 64, "seed": 0}}):
        pass
    with tracking.stage_run("vqgan", _cfg(), {"data": {"size": 64, "seed": 0}}):
        pass  # the same values again are fine
    with pytest.raises(tracking.ParamConflictError, match=r"data\.size: logged '64', now '128'"):
        with tracking.stage_run("encoder", _cfg(), {"data": {"size": 128, "seed": 0}}):
            pass


def test_failing_stage_marks_run_failed_and_skips_images_when_asked(workdir):
    with pytest.raises(ZeroDivisionError):
        with tracking.stage_run("decoder", _cfg(log_images=False), {"decoder": {"lr": 0.1}}) as t:
            t.log_image(np.zeros((4, 4, 3), np.uint8), "never")
            1 / 0
    uri = tracking.resolve_uri(_cfg(), workdir)
    (run,) = _runs(uri)
    assert run.info.status == "FAILED"
    assert run.data.tags["latent_inpaint.stage.decoder"] == "failed"
    assert _artifacts(uri, run.info.run_id, "") == []


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
