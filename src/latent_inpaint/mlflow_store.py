"""The MLflow store that tracking writes to and `latent-inpaint mlflow-ui` serves.

The store is the `tracking.uri` param, else `$MLFLOW_TRACKING_URI`, else an SQLite file in the
working directory. An SQLite store keeps its artifacts beside it in `mlruns/`. MLflow records
artifact locations as absolute paths, so every opening points those recorded under another
folder's `mlruns/` (the project was moved or copied) at its own. A new SQLite store is built in a
hidden sibling file and renamed into place when its schema is complete: a process killed while
creating it leaves only that sibling, which the next opening deletes and builds again. SQLite
answers a second, concurrent writer with "database is locked" rather than waiting in every case,
so writers take the same file lock in the working directory (`lock`).

MLflow 3 opens an experiment in its GenAI view unless told otherwise. Its UI up to 3.x chose by
the experiment tag `mlflow.experimentKind`, set here at creation and on experiments made before;
3.17's chooses by the sidebar's "GenAI | Model training" switch instead (GenAI by default, kept in
the browser), which a link's `workflowType` query sets: `ui_url` gives that link.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import sys
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from filelock import FileLock, Timeout

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from .config import TrackingConfig

STATE_DIR = ".latent-inpaint"  # under the working directory: the lock file
EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlruns"
LOCK_TIMEOUT_S = 300.0
# `mlflow ui` otherwise starts a job-execution worker it does not need (ecosystem notes).
UI_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Model training"
UNCHOSEN_KINDS = {"", "no_inferred_type", "genai_development_inferred", "custom_model_development_inferred"}
TRAINING_VIEW = "workflowType=machine_learning"
# Each table and column where MLflow records an artifact location, and the table's key.
_LOCATIONS = (("experiments", "experiment_id", "artifact_location"), ("runs", "run_uuid", "artifact_uri"),
              ("logged_models", "model_id", "artifact_location"))
# A location under a folder's mlruns/ (the last one in the path), as a path or a file URI.
_UNDER_MLRUNS = re.compile(rf"^(file://)?(/.*)/{EMBEDDED_ARTIFACTS}(?=/|$)")

_log = logging.getLogger(__name__)


def resolve_uri(cfg: TrackingConfig, workdir: str | os.PathLike | None = None) -> str:
    """params `tracking.uri`, else $MLFLOW_TRACKING_URI, else `<workdir>/mlflow.db` (absolute)."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{workdir_of(workdir) / EMBEDDED_DB}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI; None for other stores and in-memory databases."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?")[0]
    return Path(path) if path and path != ":memory:" else None


def artifact_root(uri: str) -> Path | None:
    """Where an SQLite store keeps artifacts: `mlruns/` beside its file; None for other stores."""
    db = sqlite_file(uri)
    return None if db is None else db.resolve().parent / EMBEDDED_ARTIFACTS


def open_store(uri: str) -> MlflowClient:
    """A client of the store, created (SQLite) or migrated as needed and its artifact locations
    pointed at its own folder; an error names the URI and how to choose another. Hold `lock`."""
    try:
        from mlflow import MlflowClient

        db = sqlite_file(uri)
        if db is not None and not db.exists():
            _create_sqlite(db)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # reaches the store: migrates or fails here
        if db is not None:
            moved = repoint_artifacts(db)
            if moved:
                _log.info("pointed %d artifact locations of %s at %s", moved, db, artifact_root(uri))
        return client
    except Exception as exc:
        raise RuntimeError(
            f"cannot open the MLflow tracking store {uri!r}: {exc}\n"
            "Set params tracking.uri or the MLFLOW_TRACKING_URI environment variable to a "
            "store that works (e.g. sqlite:///mlflow.db or http://127.0.0.1:5000), or turn "
            "tracking off with tracking.enabled: false."
        ) from exc


def experiment(client: MlflowClient, name: str, artifacts: Path | None) -> str:
    """The id of experiment `name`, created (with its artifacts in `artifacts`) when missing, and
    tagged as model training unless someone chose its kind."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifacts and artifacts.as_uri(),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})  # fmt: skip
    if exp.lifecycle_stage == "deleted":
        raise RuntimeError(
            f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore "
            f"--experiment-id {exp.experiment_id}) or choose another name in params tracking.experiment"
        )
    if exp.tags.get(EXPERIMENT_KIND_TAG, "") in UNCHOSEN_KINDS:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def repoint_artifacts(db: Path) -> int:
    """Point the artifact locations `db` recorded under another folder's `mlruns/` at the one beside
    it, e.g. after the project folder moved; return how many changed. Other locations are kept."""
    root = db.resolve().parent / EMBEDDED_ARTIFACTS
    changed = 0
    with contextlib.closing(sqlite3.connect(db, timeout=LOCK_TIMEOUT_S)) as con, con:
        tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, key, column in (loc for loc in _LOCATIONS if loc[0] in tables):
            for row, location in con.execute(f"SELECT {key}, {column} FROM {table}").fetchall():
                match = _UNDER_MLRUNS.match(location or "")
                if match is None:
                    continue
                folder = urllib.parse.unquote(match[2]) if match[1] else match[2]
                if Path(folder) != root.parent:
                    con.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?",
                                (root.as_uri() + location[match.end():], row))  # fmt: skip
                    changed += 1
    return changed


def ui_command(cfg: TrackingConfig, workdir: str | os.PathLike | None = None, port: int = 5000) -> list[str]:
    """argv that serves the store in the MLflow UI on 127.0.0.1; run it with `UI_ENV` added."""
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", resolve_uri(cfg, workdir),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip


def ui_url(cfg: TrackingConfig, workdir: str | os.PathLike | None = None, port: int = 5000,
           elsewhere: list[Path] = ()) -> str:  # fmt: skip
    """Ready the store `ui_command` serves and return the link to its experiment's runs in MLflow's
    training view. An SQLite store that does not exist is refused (UsageError naming where it was
    looked for, and any store in the `elsewhere` folders) rather than served empty; one that
    exists has its artifact locations pointed at its own folder and its experiment tagged."""
    from .usage import UsageError

    workdir = workdir_of(workdir)
    uri = resolve_uri(cfg, workdir)
    base = f"http://127.0.0.1:{port}/"
    db = sqlite_file(uri)
    if db is None:
        return base
    if not db.is_file():
        found = [str(Path(d) / EMBEDDED_DB) for d in elsewhere if (Path(d) / EMBEDDED_DB).is_file()]
        raise UsageError(
            f"no MLflow store at {db} (tracking store {uri}, looked for from {workdir}): nothing was tracked "
            "here, and an empty one is not served. Run this from the project folder that holds mlflow.db"
            + (f" (there is one at {', '.join(found)})" if found else "")
            + ", or name the store with params tracking.uri or $MLFLOW_TRACKING_URI."
        )
    with locked(lock(workdir)):
        client = open_store(uri)
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None or exp.lifecycle_stage == "deleted":
            return f"{base}#/experiments?{TRAINING_VIEW}"
        experiment(client, cfg.experiment, artifact_root(uri))
    return f"{base}#/experiments/{exp.experiment_id}?{TRAINING_VIEW}"


def lock(workdir: Path) -> FileLock:
    """The working directory's tracking lock (not yet taken: use it with `locked`)."""
    (workdir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    return FileLock(workdir / STATE_DIR / "mlflow.lock", timeout=LOCK_TIMEOUT_S)


@contextlib.contextmanager
def locked(file_lock: FileLock) -> Iterator[None]:
    try:
        with file_lock:
            yield
    except Timeout:
        raise RuntimeError(
            f"waited {LOCK_TIMEOUT_S:.0f} s for the tracking lock {file_lock.lock_file}: is another "
            "latent-inpaint process stuck? (A lock on a network file system may never be granted.)"
        ) from None


def workdir_of(workdir: str | os.PathLike | None) -> Path:
    return (Path.cwd() if workdir is None else Path(workdir)).resolve()


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
