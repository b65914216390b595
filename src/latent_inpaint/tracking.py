"""MLflow tracking: one run per pipeline invocation, shared by every stage that runs in it.

Snakemake runs each job as its own process (locally or as a SLURM job), so the stages of one
`snakemake` call meet in MLflow through an id the Snakefile puts in the environment
(`LATENT_INPAINT_INVOCATION`, see `ensure_invocation`): the first stage to start creates the run
tagged with it, the others find it. A file lock makes find-or-create atomic across processes.
A stage started without the variable (a standalone CLI call) gets a run of its own.

The store is the `tracking.uri` param, else `$MLFLOW_TRACKING_URI`, else an SQLite file in the
working directory with artifacts beside it in `mlruns/`. SQLite lets one writer in at a time and
answers a second, concurrent one with "database is locked" rather than waiting in every case, so
for SQLite stores every write goes through the same file lock.

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
INVOCATION_TAG = "latent_inpaint.invocation"
STAGE_TAG_PREFIX = "latent_inpaint.stage."  # + stage name: running | done | failed
STATE_DIR = ".latent-inpaint"  # under the working directory: the lock file
EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlruns"
# `mlflow ui` otherwise starts a job-execution worker it does not need (ecosystem notes).
UI_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

LOCK_TIMEOUT_S = 300.0
_NAME = re.compile(r"[A-Za-z0-9_\-.]+")
_log = logging.getLogger(__name__)


class ParamConflictError(ValueError):
    """A stage logged a parameter that its pipeline run already holds with another value."""


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
    """Track one stage inside its invocation's run; the stage tag ends `done` or `failed`.

    `params` holds the param sections the stage reads, e.g. {"data": {...}, "vqgan": {...}};
    they are logged flattened (`data.size`). With `cfg.enabled` false nothing is opened or written
    and the tracker's methods do nothing.
    """
    _check_name("stage", stage)
    if not cfg.enabled:
        yield Tracker(stage)
        return
    store = _Store.open(cfg, _workdir(workdir))
    invocation = os.environ.get(INVOCATION_ENV) or uuid.uuid4().hex
    _check_name(INVOCATION_ENV, invocation)
    run_id = store.run_for(invocation, cfg.experiment)
    store.log_params(run_id, flatten_params(params), invocation)
    store.set_stage(run_id, stage, "running")
    try:
        yield Tracker(stage, store, run_id, cfg.log_images)
    except BaseException:
        try:
            store.set_stage(run_id, stage, "failed")
        except Exception as exc:  # the stage's own error is the one to report
            _log.warning("could not mark stage %s failed in MLflow run %s: %s", stage, run_id, exc)
        raise
    store.set_stage(run_id, stage, "done")


class Tracker:
    """What a stage logs to its run; every name lands under `<stage>/`. Inert when disabled."""

    def __init__(
        self, stage: str, store: _Store | None = None, run_id: str | None = None, log_images: bool = False
    ):
        self.stage = stage
        self.run_id = run_id
        self._store = store
        self._log_images = log_images

    @property
    def enabled(self) -> bool:
        return self._store is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._store is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(f"{self.stage}/{k}", float(v), now, step or 0) for k, v in metrics.items()]
        self._store.log_batch(self.run_id, metrics=batch)

    def log_image(self, image: Any, name: str) -> None:
        """A PIL image, an (H, W) / (H, W, 3|4) uint8 array, or an image file, stored as PNG."""
        if self._store is None or not self._log_images:
            return
        name = name if name.lower().endswith(".png") else f"{name}.png"
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp, PurePosixPath(name).name)
            if isinstance(image, (str, os.PathLike)) and Path(image).suffix.lower() == ".png":
                shutil.copyfile(image, local)
            else:
                _to_pil(image).save(local)
            self._upload(local, name)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file or a folder, kept under its own name at `<stage>/<artifact_path>/`."""
        if self._store is None:
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"cannot log artifact {path}: no such file or folder")
        dest = self._artifact_dir(f"{artifact_path}/{path.name}" if artifact_path else path.name)
        if path.is_dir():
            self._store.client.log_artifacts(self.run_id, str(path), dest.as_posix())
        else:
            self._store.client.log_artifact(self.run_id, str(path), dest.parent.as_posix())

    def log_dict(self, d: Mapping[str, Any], name: str) -> None:
        """`d` as a JSON file `<stage>/<name>` (`.json` appended when missing)."""
        if self._store is None:
            return
        name = name if name.lower().endswith(".json") else f"{name}.json"
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp, PurePosixPath(name).name)
            local.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
            self._upload(local, name)

    def _artifact_dir(self, name: str) -> PurePosixPath:
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"artifact name must be a relative path without '..', got {name!r}")
        return PurePosixPath(self.stage) / rel

    def _upload(self, local: Path, name: str) -> None:
        self._store.client.log_artifact(self.run_id, str(local), self._artifact_dir(name).parent.as_posix())


# ---------------------------------------------------------------------------------- the store


class _Store:
    """An opened MLflow store plus the lock that orders this working directory's writers."""

    def __init__(self, client: MlflowClient, uri: str, workdir: Path, lock: FileLock):
        self.client = client
        self.uri = uri
        self.workdir = workdir
        self.lock = lock

    @classmethod
    def open(cls, cfg: TrackingConfig, workdir: Path) -> _Store:
        uri = resolve_uri(cfg, workdir)
        state = workdir / STATE_DIR
        state.mkdir(parents=True, exist_ok=True)
        lock = FileLock(state / "mlflow.lock", timeout=LOCK_TIMEOUT_S)
        # Creating a fresh SQLite store runs its schema migrations: two processes must not.
        with _locked(lock):
            try:
                from mlflow import MlflowClient

                client = MlflowClient(tracking_uri=uri)
                client.get_experiment_by_name(cfg.experiment)
            except Exception as exc:
                raise RuntimeError(
                    f"cannot open the MLflow tracking store {uri!r}: {exc}\n"
                    "Set params tracking.uri or the MLFLOW_TRACKING_URI environment variable to a "
                    "store that works (e.g. sqlite:///mlflow.db or http://127.0.0.1:5000), or turn "
                    "tracking off with tracking.enabled: false."
                ) from exc
        return cls(client, uri, workdir, lock)

    def writing(self):
        """Held around every write: SQLite answers concurrent writers with errors."""
        return _locked(self.lock) if self.uri.startswith("sqlite:") else contextlib.nullcontext()

    @property
    def embedded(self) -> bool:
        return self.uri == f"sqlite:///{self.workdir / EMBEDDED_DB}"

    def run_for(self, invocation: str, experiment: str) -> str:
        """The id of the invocation's run in `experiment`, created by the first caller."""
        with _locked(self.lock):
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = (self.workdir / EMBEDDED_ARTIFACTS).as_uri() if self.embedded else None
                exp_id = self.client.create_experiment(experiment, artifact_location=location)
            elif exp.lifecycle_stage == "deleted":
                raise RuntimeError(
                    f"MLflow experiment {experiment!r} in {self.uri} is deleted: restore it "
                    f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or choose "
                    "another name in params tracking.experiment"
                )
            else:
                exp_id = exp.experiment_id
            found = self.client.search_runs(
                [exp_id], filter_string=f"tags.`{INVOCATION_TAG}` = '{invocation}'", max_results=1
            )
            if found:
                return found[0].info.run_id
            name = f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}-{invocation[:8]}"
            run = self.client.create_run(exp_id, run_name=name, tags={INVOCATION_TAG: invocation})
            return run.info.run_id

    def log_params(self, run_id: str, flat: dict[str, str], invocation: str) -> None:
        """Log what the run lacks; a key it holds with another value is a ParamConflictError."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        with self.writing():
            held = self.client.get_run(run_id).data.params
            self._check_conflicts(run_id, held, flat, invocation)
            try:
                self.log_batch(run_id, params=[Param(k, v) for k, v in flat.items() if k not in held])
            except MlflowException:
                # Another process of the run got in first (remote stores are not locked).
                self._check_conflicts(run_id, self.client.get_run(run_id).data.params, flat, invocation)
                raise

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        """MLflow caps a batch at 1000 metrics and 100 params or tags."""
        metrics, params, tags = list(metrics), list(params), list(tags)
        with self.writing():
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(run_id, metrics=metrics[i : i + 1000])
            for i in range(0, max(len(params), len(tags)), 100):
                self.client.log_batch(run_id, params=params[i : i + 100], tags=tags[i : i + 100])

    def set_stage(self, run_id: str, stage: str, state: str) -> None:
        """Tag the stage, then derive the run's status from all its stage tags."""
        with _locked(self.lock):
            self.client.set_tag(run_id, STAGE_TAG_PREFIX + stage, state)
            run = self.client.get_run(run_id)
            states = {v for k, v in run.data.tags.items() if k.startswith(STAGE_TAG_PREFIX)}
            status = "FAILED" if "failed" in states else "RUNNING" if "running" in states else "FINISHED"
            if status == "RUNNING":
                if run.info.status != status:
                    self.client.update_run(run_id, status)
            else:
                self.client.set_terminated(run_id, status)  # stamps the end time

    @staticmethod
    def _check_conflicts(
        run_id: str, held: Mapping[str, str], flat: Mapping[str, str], invocation: str
    ) -> None:
        clashes = [f"{k}: logged {held[k]!r}, now {v!r}" for k, v in flat.items() if held.get(k, v) != v]
        if clashes:
            raise ParamConflictError(
                f"MLflow run {run_id} (invocation {invocation}) already holds other values for "
                f"{len(clashes)} param(s): {'; '.join(clashes)}. MLflow params cannot change within a "
                f"run, and one pipeline invocation must use one set of params: start a new "
                f"invocation (a new snakemake call, or unset {INVOCATION_ENV} if it was exported by hand)."
            )


# ---------------------------------------------------------------------------------- helpers


def _workdir(workdir: str | os.PathLike | None) -> Path:
    return (Path.cwd() if workdir is None else Path(workdir)).resolve()


def _check_name(what: str, name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{what} must use only letters, digits, '_', '-' and '.', got {name!r}")


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


def _to_pil(image: Any):
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as img:
            return img.copy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ValueError(
                f"log_image expects a uint8 array of shape (H, W), (H, W, 3) or (H, W, 4), "
                f"got {image.dtype} {image.shape}"
            )
        return Image.fromarray(image)
    raise TypeError(
        f"log_image expects a PIL image, a uint8 numpy array or a path, got {type(image).__name__}"
    )
