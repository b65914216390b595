"""MLflow tracking with nested runs: a parent run per pipeline invocation, a child run per stage.

Snakemake runs each job as its own process (locally or as a SLURM job). The jobs of one call
share an id that the Snakefile puts in the environment (`LATENT_INPAINT_INVOCATION`, see
`ensure_invocation`): the first to start creates the parent run tagged with it, the others find
it, under a file lock in the working directory. A standalone CLI call gets a parent of its own.

The store (mlflow_store.py) is the `tracking.uri` param, else `$MLFLOW_TRACKING_URI`, else an
SQLite file in the working directory; for SQLite stores every write goes through its file lock.
Every run is tagged with the git commit of the code (`mlflow.source.git.commit`) and whether
tracked files differed from it.

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
import subprocess
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from filelock import FileLock

from .mlflow_store import artifact_root, experiment, locked, open_store, resolve_uri, workdir_of
from .mlflow_store import lock as store_lock  # `lock` names a variable here

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from .config import TrackingConfig

TRACKING_ENV = "LATENT_INPAINT_TRACKING"  # set by the Snakefile: tracking settings are no rerun trigger
INVOCATION_ENV = "LATENT_INPAINT_INVOCATION"
INVOCATION_TAG = "latent_inpaint.invocation"  # on the parent run
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting: the UI folds a child under its parent
GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_DIRTY_TAG = "latent_inpaint.git.dirty"  # "true" when tracked files differed from the commit
WEIGHTS_TAG = "latent_inpaint.weights"  # a trained stage's final/ folder, absolute
WEIGHTS_DVC_TAG = "latent_inpaint.weights.dvc"  # the same, relative to the project: DVC's path
WEIGHTS_ARTIFACTS = "weights"  # with tracking.log_models: the final/ folder as artifacts
EVALUATION_ARTIFACTS = "evaluation"

_log = logging.getLogger(__name__)


def tracking_config(params: Mapping[str, Any]) -> TrackingConfig:
    """The tracking settings: $LATENT_INPAINT_TRACKING (JSON, from the Snakefile) or params'."""
    from .config import TrackingConfig, build, section

    if os.environ.get(TRACKING_ENV):
        return build(TrackingConfig, json.loads(os.environ[TRACKING_ENV]), f"${TRACKING_ENV}")
    return section(params, "tracking")


def ensure_invocation() -> str:
    """The current invocation id; a new one is put in the environment for child processes."""
    return os.environ.setdefault(INVOCATION_ENV, uuid.uuid4().hex)


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
    opened = _Invocation.open(cfg, workdir)
    client, exp_id, parent = opened.client, opened.exp_id, opened.parent
    with locked(opened.lock):
        child = client.create_run(exp_id, run_name=stage, tags={PARENT_TAG: parent, **opened.git}).info.run_id
        _settle(client, exp_id, parent)

    def end(status: str) -> None:
        with locked(opened.lock):
            client.set_terminated(child, status)
            _settle(client, exp_id, parent)

    tracker = opened.tracker(child, cfg)
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


@contextlib.contextmanager
def invocation_run(cfg: TrackingConfig, workdir: str | os.PathLike | None = None) -> Iterator[Tracker]:
    """The invocation's parent run itself, for what belongs to the whole pipeline run (the report,
    every evaluation's numbers); found or created as `stage_run` does, its status left to its
    children. With `cfg.enabled` false the tracker does nothing."""
    if not cfg.enabled:
        yield Tracker()
        return
    opened = _Invocation.open(cfg, workdir)
    yield opened.tracker(opened.parent, cfg)
    with locked(opened.lock):
        _settle(opened.client, opened.exp_id, opened.parent)


@dataclasses.dataclass(frozen=True)
class _Invocation:
    """An opened store with this invocation's parent run in the experiment."""

    client: MlflowClient
    uri: str
    workdir: Path
    lock: FileLock
    exp_id: str
    parent: str
    git: dict[str, str]  # the git tags every run gets

    @classmethod
    def open(cls, cfg: TrackingConfig, workdir: str | os.PathLike | None) -> _Invocation:
        invocation = os.environ.get(INVOCATION_ENV) or uuid.uuid4().hex
        if not re.fullmatch(r"[A-Za-z0-9_\-.]+", invocation):  # it goes into a search filter
            raise ValueError(f"{INVOCATION_ENV} must use only letters, digits, '_', '-' and '.', got {invocation!r}")
        workdir = workdir_of(workdir)
        uri = resolve_uri(cfg, workdir)
        lock = store_lock(workdir)
        commit, dirty = git_state(Path(__file__).parent, workdir)
        git = {GIT_COMMIT_TAG: commit, GIT_DIRTY_TAG: dirty}
        # The lock makes find-or-create of the parent atomic, and keeps two processes from running
        # a fresh SQLite store's schema migrations at once.
        with locked(lock):
            client = open_store(uri)
            exp_id = experiment(client, cfg.experiment, artifact_root(uri))
            found = client.search_runs([exp_id], f"tags.`{INVOCATION_TAG}` = '{invocation}'", max_results=1)
            if found:
                parent = found[0].info.run_id
            else:
                name = f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}-{invocation[:8]}"
                tags = {INVOCATION_TAG: invocation, **git}
                parent = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        return cls(client, uri, workdir, lock, exp_id, parent, git)

    def tracker(self, run_id: str, cfg: TrackingConfig) -> Tracker:
        write_lock = self.lock if self.uri.startswith("sqlite:") else None
        return Tracker(self.client, run_id, cfg.log_images, write_lock, cfg.log_models, self.workdir)


def git_state(*folders: str | os.PathLike) -> tuple[str, str]:
    """(commit, "true"/"false": tracked files differ from it) of the first git checkout among
    `folders`; ("unknown", "unknown") without git or outside any checkout."""
    def git(folder, *args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(folder), *args], capture_output=True,
                              text=True, timeout=60, check=True).stdout.strip()  # fmt: skip

    for folder in folders:
        try:
            commit = git(folder, "rev-parse", "HEAD")
            changed = git(folder, "status", "--porcelain", "--untracked-files=no")
        except (OSError, subprocess.SubprocessError):
            continue
        return commit, "true" if changed else "false"
    return "unknown", "unknown"


class Tracker:
    """What a stage logs to its own child run. Inert when disabled.

    Names carry no `<stage>/` prefix: the run is the stage. Stages that log the same quantity
    (encoder and encoder_vanilla, the evaluation variants) then share metric names, which MLflow's
    compare view draws on one chart.
    """

    def __init__(self, client: MlflowClient | None = None, run_id: str | None = None, log_images: bool = False,
                 write_lock: FileLock | None = None, log_models: bool = False, workdir: Path | None = None):  # fmt: skip
        self.run_id = run_id
        self._client = client
        self._log_images = log_images
        self._write_lock = write_lock  # SQLite answers concurrent writers with errors
        self._log_models = log_models
        self._workdir = workdir

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

    def log_weights(self, folder: str | os.PathLike) -> None:
        """Tag where a stage's trained weights are: `folder` (its final/) and its path in the project,
        the one DVC tracks; with params tracking.log_models, the folder itself under `weights/`."""
        if self._client is None:
            return
        from mlflow.entities import RunTag

        folder = Path(folder).resolve()
        tags = [RunTag(WEIGHTS_TAG, str(folder))]
        if self._workdir is not None and folder.is_relative_to(self._workdir):
            tags.append(RunTag(WEIGHTS_DVC_TAG, folder.relative_to(self._workdir).as_posix()))
        self._log_batch(tags=tags)
        if self._log_models:
            self.log_artifact(folder, WEIGHTS_ARTIFACTS)

    def log_evaluation(self, result: Mapping[str, Any] | str | os.PathLike, name: str) -> None:
        """An evaluation's result (its JSON file, or the dict): the JSON as `evaluation/<name>.json`
        and every number in it as a metric named by its keys under `name` (`evaluate/ours/box/fid`)."""
        if self._client is None:
            return
        from mlflow.entities import Metric

        if not isinstance(result, Mapping):
            result = json.loads(Path(result).read_text())
        self.log_dict(result, f"{EVALUATION_ARTIFACTS}/{name}")
        now = int(time.time() * 1000)
        self._log_batch(metrics=[Metric(k, v, now, 0) for k, v in numbers(result, f"{name}/").items()])

    def _log_batch(self, metrics=(), params=(), tags=()) -> None:
        """MLflow caps a batch at 1000 metrics and 100 params or tags."""
        with contextlib.nullcontext() if self._write_lock is None else locked(self._write_lock):
            for i in range(0, len(metrics), 1000):
                self._client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
            for i in range(0, len(params), 100):
                self._client.log_batch(self.run_id, params=params[i : i + 100])
            for i in range(0, len(tags), 100):
                self._client.log_batch(self.run_id, tags=tags[i : i + 100])


def numbers(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers in a JSON tree by their key paths ({"a": {"b": 1}} -> {"a/b": 1.0}), named as
    MLflow allows; flags, text and lists are left out."""
    found: dict[str, float] = {}
    for key, value in tree.items():
        name = prefix + re.sub(r"[^\w\-. :]", "", str(key)).strip()
        if isinstance(value, Mapping):
            found.update(numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[name] = float(value)
    return found


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


def _folder(name: str) -> str | None:
    """The folder part of an artifact name; None for the run's top folder."""
    parent = PurePosixPath(name).parent.as_posix()
    return None if parent == "." else parent
