"""`latent-inpaint mlflow-ui` for real: an invocation logged by the tracking API (a parent run
with a child per stage), read back over REST as the UI reads it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import browser
import numpy as np
import pytest
from conftest import REPO, venv_bin
from PIL import Image

from latent_inpaint import mlflow_store, tracking
from latent_inpaint.config import section
from latent_inpaint.params import load_params

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOSSES = [(0, 3.0), (10, 2.0), (20, 1.5)]
PARAMS = {"data": {"size": 32}, "vqgan": {"steps": 20, "lr": 1e-4}}
FLAT_PARAMS = {"data.size": "32", "vqgan.steps": "20", "vqgan.lr": "0.0001"}
INVOCATION = "5eed0fca11ab1e00"


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A working directory with the project's params.yaml and no inherited tracking URI."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = tmp_path / "project"
    work.mkdir()
    shutil.copyfile(REPO / "params.yaml", work / "params.yaml")
    return work


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_invocation(workdir: Path, picture: Path, monkeypatch) -> dict[str, str]:
    """Two stages of one invocation, as the pipeline logs them: masks (a metric) and vqgan (its
    params, a loss at steps 0/10/20 and a picture). Returns {stage: child run id}."""
    monkeypatch.setenv(tracking.INVOCATION_ENV, INVOCATION)
    cfg = section(load_params([workdir / "params.yaml"]), "tracking")
    with tracking.stage_run("masks", cfg, {"masks": {"seed": 2024}}, workdir) as run:
        run.log_metrics({"hole_ratio": 0.25})
        ids = {"masks": run.run_id}
    with tracking.stage_run("vqgan", cfg, PARAMS, workdir) as run:
        for step, loss in LOSSES:
            run.log_metrics({"loss": loss}, step=step)
        run.log_image(picture, "samples/grid.png")
        ids["vqgan"] = run.run_id
    return ids


def _picture(path: Path) -> Path:
    img = Image.new("RGB", (16, 16))
    img.putdata([(16 * x, 16 * y, 128) for y in range(16) for x in range(16)])
    img.save(path)
    return path


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it lingers; the group ends empty."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)
    # The uvicorn child may outlive its parent by a moment; what is left after that is killed.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def _ui(cwd: Path, port: int, log: Path) -> Iterator[subprocess.Popen]:
    """`latent-inpaint mlflow-ui --port N` in `cwd`, stopped and its port closed on the way out."""
    env = {**os.environ, "PATH": venv_bin()}
    env.pop("MLFLOW_TRACKING_URI", None)
    exe = Path(sys.executable).parent / "latent-inpaint"
    with open(log, "wb") as out:
        start = time.monotonic()
        proc = subprocess.Popen(
            [str(exe), "mlflow-ui", "--port", str(port)],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"mlflow-ui exited with {proc.returncode}:\n{log.read_text()}")
                if time.monotonic() - start > START_TIMEOUT_S:
                    pytest.fail(f"mlflow-ui did not answer in {START_TIMEOUT_S:.0f} s:\n{log.read_text()}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.25)
            yield proc
        finally:
            _stop(proc)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


class _Rest:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def raw(self, path: str, /, **query) -> bytes:
        url = f"{self.base}{path}?{urllib.parse.urlencode(query)}" if query else f"{self.base}{path}"
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.read()

    def get(self, endpoint: str, /, **query) -> dict:
        return json.loads(self.raw(f"/api/2.0/mlflow/{endpoint}", **query))

    def post(self, endpoint: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{self.base}/api/2.0/mlflow/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def check_invocation(self, experiment: str, ids: dict[str, str], picture: Path) -> None:
        """One parent run with a child per stage, as the UI nests them; vqgan's params, loss by
        step and PNG's bytes."""
        exp_id = self.get("experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
        runs = self.post("runs/search", {"experiment_ids": [exp_id]})["runs"]
        tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
        (parent,) = [r for r in runs if tracking.PARENT_TAG not in tags[r["info"]["run_id"]]]
        parent_id = parent["info"]["run_id"]
        assert tags[parent_id][tracking.INVOCATION_TAG] == INVOCATION
        assert parent["info"]["status"] == "FINISHED"
        assert len(runs) == 1 + len(ids)

        # The UI lists a parent's children by this filter.
        nested = f"tags.`{tracking.PARENT_TAG}` = '{parent_id}'"
        children = self.post("runs/search", {"experiment_ids": [exp_id], "filter": nested})["runs"]
        assert {r["info"]["run_name"]: r["info"]["run_id"] for r in children} == ids
        assert all(r["info"]["status"] == "FINISHED" for r in children)
        (masks,) = [r for r in children if r["info"]["run_id"] == ids["masks"]]
        assert {p["key"]: p["value"] for p in masks["data"]["params"]} == {"masks.seed": "2024"}
        assert {m["key"]: m["value"] for m in masks["data"]["metrics"]} == {"hole_ratio": 0.25}

        run_id = ids["vqgan"]
        (vqgan,) = [r for r in children if r["info"]["run_id"] == run_id]
        assert {p["key"]: p["value"] for p in vqgan["data"]["params"]} == FLAT_PARAMS
        history = self.get("metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
        assert sorted((m["step"], m["value"]) for m in history) == LOSSES

        listed = self.get("artifacts/list", run_id=run_id, path="samples")["files"]
        assert [(f["path"], f["is_dir"]) for f in listed] == [("samples/grid.png", False)]
        assert int(listed[0]["file_size"]) == picture.stat().st_size
        data = self.raw("/get-artifact", path="samples/grid.png", run_uuid=run_id)
        assert data.startswith(PNG_SIGNATURE)
        assert data == picture.read_bytes()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (kernel hex) of the TCP sockets listening on `port`, IPv4 and IPv6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


def _non_loopback_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), if any."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def test_mlflow_ui_serves_the_embedded_store_on_loopback(project, tmp_path, monkeypatch):
    picture = _picture(tmp_path / "grid.png")
    ids = _log_invocation(project, picture, monkeypatch)
    assert (project / "mlflow.db").is_file() and (project / "mlruns").is_dir()

    port = _free_port()
    log = tmp_path / "ui.log"
    with _ui(project, port, log) as proc:
        assert "starting:" in log.read_text()
        # `latent-inpaint` execs mlflow in place: the same pid now runs `mlflow ui`.
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{project.resolve() / 'mlflow.db'}"
        if Path("/proc/net/tcp").exists():
            assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing on IPv6
        other = _non_loopback_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()

        _Rest(port).check_invocation("latent-inpaint", ids, picture)


def test_tracking_uri_names_a_team_server(project, tmp_path, monkeypatch):
    server_dir = tmp_path / "team-server"
    server_dir.mkdir()
    shutil.copyfile(REPO / "params.yaml", server_dir / "params.yaml")
    mlflow_store.open_store(f"sqlite:///{server_dir / 'mlflow.db'}")  # mlflow-ui serves no store it would make
    picture = _picture(tmp_path / "grid.png")

    port = _free_port()
    with _ui(server_dir, port, tmp_path / "server.log"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        monkeypatch.chdir(project)
        ids = _log_invocation(project, picture, monkeypatch)
        _Rest(port).check_invocation("latent-inpaint", ids, picture)

    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()
    assert (server_dir / "mlflow.db").is_file()
    assert [p.name for p in (server_dir / "mlartifacts").rglob("grid.png")] == ["grid.png"]


def test_the_browser_shows_the_runs_their_metrics_and_pictures(project, tmp_path, monkeypatch):
    """The page `mlflow-ui` names lists the runs in the training view; the pipeline run's page
    shows the evaluation's metrics and its artifact page the sample grid (what the report stage
    logs), in headless Chromium: rendered DOM and screenshots."""
    browser.browser()
    picture = _picture(tmp_path / "grid.png")
    ids = _log_invocation(project, picture, monkeypatch)
    cfg = section(load_params([project / "params.yaml"]), "tracking")
    grid = tmp_path / "samples.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(grid)
    with tracking.invocation_run(cfg, project) as parent:
        parent.log_evaluation({"ours": {"box": {"fid": 12.5, "hole_psnr": 21.0}}}, "evaluate")
        parent.log_artifact(grid, "report")

    port = _free_port()
    log = tmp_path / "ui.log"
    with _ui(project, port, log):
        (url,) = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("open ")]
        rest = _Rest(port)
        rest.check_invocation("latent-inpaint", ids, picture)  # the report's parent is the stages' parent
        exp = rest.get("experiments/get-by-name", experiment_name="latent-inpaint")["experiment"]
        tags = {t["key"]: t["value"] for t in exp["tags"]}
        assert tags[mlflow_store.EXPERIMENT_KIND_TAG] == mlflow_store.EXPERIMENT_KIND
        assert url == f"http://127.0.0.1:{port}/#/experiments/{exp['experiment_id']}?{mlflow_store.TRAINING_VIEW}"
        run_page = url.replace("?", f"/runs/{parent.run_id}?")
        picture_page = url.replace("?", f"/runs/{parent.run_id}/artifacts/report/samples.png?")

        runs = browser.render(url, tmp_path / "runs.png")
        assert "pipeline-" in runs and "Model training" in runs  # the parent run, listed
        metrics = browser.render(run_page, tmp_path / "run.png")
        assert "evaluate/ours/box/fid" in metrics and "evaluate/ours/box/hole_psnr" in metrics
        assert 'alt="report/samples.png"' in browser.render(picture_page, tmp_path / "picture.png")
        for name in ("runs", "run", "picture"):
            browser.assert_not_blank(tmp_path / f"{name}.png")
