"""MLflow tracking with nested runs: a parent run per pipeline invocation, a child run per stage.

Snakemake runs each job as its own process (locally or as a SLURM job). The jobs of one call
share an id that the Snakefile puts in the environment (`LATENT_INPAINT_INVOCATION`, see
`ensure_invocation`): the first to start creates the parent run tagged with it, the others find
it, under a file lock in the working directory. A standalone CLI call gets a parent of its own.

The store is the `tracking.uri` param, else `$MLFLOW_TRACKING_URI`, else an SQLite file in the
working directory with artifacts beside it in `mlruns/`. SQLite lets one writer in at a time and
answers a second, concurrent one with "database is locked" rather than waiting in every case, so
for SQLite stores every write goes through the same file lock. A new SQLite store is built in a
hidden sibling file and renamed into place when its schema is complete: a process killed while
creating it leaves only that sibling, which the next run deletes and builds again.

mlflow takes over a second to import, so it is imported only when a stage actually tracks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from filelock import FileLock, Timeout

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from .config import TrackingConfig

TRACKING_ENV = "LATENT_INPAINT_TRACKING"  # set by the Snakefile: tracking settings are no rerun trigger
INVOCATION_ENV = "LATENT_INPAINT_INVOCATION"
INVOCATION_TAG = "latent_inpaint.invocation"  # on the parent run
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting: the UI folds a child under its parent
STATE_DIR = ".latent-inpaint"  # under the working directory: the lock file
EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlruns"
# `mlflow ui` otherwise starts a job-execution worker it does not need (ecosystem notes).
UI_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

LOCK_TIMEOUT_S = 300.0
_log = logging.getLogger(__name__)


def tracking_config(params: Mapping[str, Any]) -> TrackingConfig:
    """The tracking settings: $LATENT_INPAINT_TRACKING (JSON, from the Snakefile) or params'."""
    from .config import TrackingConfig, build, section

    if os.environ.get(TRACKING_ENV):
        return build(TrackingConfig, json.loads(os.environ[TRACKING_ENV]), f"${TRACKING_ENV}")
    return section(params, "tracking")


def resolve_uri(cfg: TrackingConfig, workdir: str | os.PathLike | None = None) -> str:
    """params `tracking.uri`, else $MLFLOW_TRACKING_URI, else `<workdir>/mlflow.db` (absolute)."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{_workdir(workdir) / EMBEDDED_DB}"


def ensure_invocation() -> str:
    """The current invocation id; a new one is put in the environment for child processes."""
    return os.environ.setdefault(INVOCATION_ENV, uuid.uuid4().hex)


def ui_command(cfg: TrackingConfig, workdir: str | os.PathLike | None = None, port: int = 5000) -> list[str]:
    """argv that serves the store in the MLflow UI on 127.0.0.1; run it with `UI_ENV` added."""
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", resolve_uri(cfg, workdir),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"data": {"size": 64}} -> {"data.size": "64"}; lists as JSON, dataclasses as mappings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, (list, tuple, Mapping)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = str(value)
    return flat


@contextlib.contextmanager
def stage_run(
    stage: str,
    cfg: TrackingConfig,
    params: Mapping[str, Any],
    workdir: str | os.PathLike | None = None,
) -> Iterator[Tracker]:
    """Track one stage as a child run (named `stage`) of its invocation's parent run.

    `params` holds the param sections the stage reads, e.g. {"data": {...}, "vqgan": {...}};
    they are logged flattened (`data.size`) to the child. The child ends FINISHED, or FAILED when
    the block raises. With `cfg.enabled` false nothing is opened or written and the tracker's
    methods do nothing.
    """
    if not cfg.enabled:
        yield Tracker()
        return
    invocation = os.environ.get(INVOCATION_ENV) or uuid.uuid4().hex
    if not re.fullmatch(r"[A-Za-z0-9_\-.]+", invocation):  # it goes into a search filter
        raise ValueError(f"{INVOCATION_ENV} must use only letters, digits, '_', '-' and '.', got {invocation!r}")
    workdir = _workdir(workdir)
    uri = resolve_uri(cfg, workdir)
    (workdir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    lock = FileLock(workdir / STATE_DIR / "mlflow.lock", timeout=LOCK_TIMEOUT_S)
    # The lock makes find-or-create of the parent atomic, and keeps two processes from running a
    # fresh SQLite store's schema migrations at once.
    with _locked(lock):
        client = _open(uri)
        embedded = uri == f"sqlite:///{workdir / EMBEDDED_DB}"
        exp_id = _experiment(client, cfg.experiment, workdir / EMBEDDED_ARTIFACTS if embedded else None)
        found = client.search_runs([exp_id], f"tags.`{INVOCATION_TAG}` = '{invocation}'", max_results=1)
        if found:
            parent = found[0].info.run_id
        else:
            name = f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}-{invocation[:8]}"
            parent = client.create_run(exp_id, run_name=name, tags={INVOCATION_TAG: invocation}).info.run_id
        child = client.create_run(exp_id, run_name=stage, tags={PARENT_TAG: parent}).info.run_id
        _settle(client, exp_id, parent)

    def end(status: str) -> None:
        with _locked(lock):
            client.set_terminated(child, status)
            _settle(client, exp_id, parent)

    tracker = Tracker(client, child, cfg.log_images, lock if uri.startswith("sqlite:") else None)
    try:
        from mlflow.entities import Param

        tracker._log_batch(params=[Param(k, v) for k, v in flatten_params(params).items()])
        yield tracker
    except BaseException:
        try:
            end("FAILED")
        except Exception as exc:  # the stage's own error is the one to report
            _log.warning("could not mark MLflow run %s (stage %s) failed: %s", child, stage, exc)
        raise
    end("FINISHED")


class Tracker:
    """What a stage logs to its own child run. Inert when disabled.

    Names carry no `<stage>/` prefix: the run is the stage. Stages that log the same quantity
    (encoder and encoder_vanilla, the evaluation variants) then share metric names, which MLflow's
    compare view draws on one chart.
    """

    def __init__(self, client: MlflowClient | None = None, run_id: str | None = None,
                 log_images: bool = False, write_lock: FileLock | None = None):  # fmt: skip
        self.run_id = run_id
        self._client = client
        self._log_images = log_images
        self._write_lock = write_lock  # SQLite answers concurrent writers with errors

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_batch(metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def log_image(self, image: Any, name: str) -> None:
        """A PIL image, an (H, W) / (H, W, 3|4) uint8 array, or an image file, stored as PNG."""
        if self._client is None or not self._log_images:
            return
        name = name if name.lower().endswith(".png") else f"{name}.png"
        if not isinstance(image, (str, os.PathLike)):
            self._client.log_image(self.run_id, image, artifact_file=name)
            return
        with tempfile.TemporaryDirectory() as tmp:  # a file is kept byte for byte under `name`
            local = Path(tmp, PurePosixPath(name).name)
            if Path(image).suffix.lower() == ".png":
                shutil.copyfile(image, local)
            else:
                from PIL import Image

                with Image.open(image) as img:
                    img.save(local)
            self._client.log_artifact(self.run_id, str(local), _folder(name))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file or a folder, kept under its own name in `artifact_path/` (default: the top)."""
        if self._client is None:
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"cannot log artifact {path}: no such file or folder")
        dest = f"{artifact_path}/{path.name}" if artifact_path else path.name
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), dest)
        else:
            self._client.log_artifact(self.run_id, str(path), _folder(dest))

    def log_dict(self, d: Mapping[str, Any], name: str) -> None:
        """`d` as a JSON file `name` (`.json` appended when missing)."""
        if self._client is not None:
            self._client.log_dict(self.run_id, d, name if name.lower().endswith(".json") else f"{name}.json")

    def _log_batch(self, metrics=(), params=()) -> None:
        """MLflow caps a batch at 1000 metrics and 100 params."""
        with contextlib.nullcontext() if self._write_lock is None else _locked(self._write_lock):
            for i in range(0, len(metrics), 1000):
                self._client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
            for i in range(0, len(params), 100):
                self._client.log_batch(self.run_id, params=params[i : i + 100])


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI; None for other stores and in-memory databases."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?")[0]
    return Path(path) if path and path != ":memory:" else None


def _create_sqlite(db: Path) -> None:
    """Run a new store's migrations in `.<name>.creating-<pid>`, then rename it to `db`."""
    from mlflow import MlflowClient

    for stale in db.parent.glob(f".{db.name}.creating-*"):  # a killed creation's leftover
        stale.unlink()
    tmp = db.with_name(f".{db.name}.creating-{os.getpid()}")
    try:
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
        os.replace(tmp, db)
    finally:
        tmp.unlink(missing_ok=True)


def _open(uri: str) -> MlflowClient:
    try:
        from mlflow import MlflowClient

        db = sqlite_file(uri)
        if db is not None and not db.exists():
            _create_sqlite(db)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # reaches the store: migrates or fails here
        return client
    except Exception as exc:
        raise RuntimeError(
            f"cannot open the MLflow tracking store {uri!r}: {exc}\n"
            "Set params tracking.uri or the MLFLOW_TRACKING_URI environment variable to a "
            "store that works (e.g. sqlite:///mlflow.db or http://127.0.0.1:5000), or turn "
            "tracking off with tracking.enabled: false."
        ) from exc


def _experiment(client: MlflowClient, name: str, artifacts: Path | None) -> str:
    """The id of experiment `name`, created (with its artifacts in `artifacts`) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifacts and artifacts.as_uri())
    if exp.lifecycle_stage == "deleted":
        raise RuntimeError(
            f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore "
            f"--experiment-id {exp.experiment_id}) or choose another name in params tracking.experiment"
        )
    return exp.experiment_id


def _settle(client: MlflowClient, exp_id: str, parent: str) -> None:
    """The parent is FAILED if a stage failed, RUNNING while one runs, FINISHED otherwise.

    A stage's latest attempt counts: a SLURM job requeued after preemption, or a rerun after a
    crash, makes a new child of the same name whose success clears the earlier failure.
    """
    children = client.search_runs([exp_id], f"tags.`{PARENT_TAG}` = '{parent}'", order_by=["attributes.start_time ASC"])
    states = set({run.info.run_name: run.info.status for run in children}.values())
    if states & {"FAILED", "KILLED"}:
        client.set_terminated(parent, "FAILED")
    elif "RUNNING" in states:
        client.update_run(parent, "RUNNING")
    else:
        client.set_terminated(parent, "FINISHED")  # stamps the end time


def _workdir(workdir: str | os.PathLike | None) -> Path:
    return (Path.cwd() if workdir is None else Path(workdir)).resolve()


def _folder(name: str) -> str | None:
    """The folder part of an artifact name; None for the run's top folder."""
    parent = PurePosixPath(name).parent.as_posix()
    return None if parent == "." else parent


@contextlib.contextmanager
def _locked(lock: FileLock) -> Iterator[None]:
    try:
        with lock:
            yield
    except Timeout:
        raise RuntimeError(
            f"waited {LOCK_TIMEOUT_S:.0f} s for the tracking lock {lock.lock_file}: is another "
            "latent-inpaint process stuck? (A lock on a network file system may never be granted.)"
        ) from None
