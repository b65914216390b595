"""A training run's folder: one writer, resumable checkpoints, and the stage's output.

    <run_dir>/checkpoint/         the latest complete checkpoint (what a rerun resumes from)
        <module>.safetensors      weights of each module in `stage.modules`
        optimizer.pt              optimizer states, step, and every rank's torch/numpy/python RNG
        config.json               {"stage", "config": stage.config(), "models": {module: spec},
                                   "step", "steps", "world_size", "resumed_from", "losses", "files"}
    <run_dir>/final/              the stage's output, what later stages load (saved.load_model)
        <module>.safetensors
        config.json               as above, with "metrics" for "losses", and "rank_digests"
                                  (one parameter digest per rank, checked equal)
    <run_dir>/metrics.json        the final numbers: {"step", "world_size", "train", "eval"}
    <run_dir>/history.jsonl       the logged losses, one JSON line per logged step (the curves)
    <run_dir>/curves.json         the same as one JSON list, a record per step (`dvc plots`, the report)

Both folders are model folders (`saved`), replaced by its rename protocol. At start-up, under a
lock file (so only one process trains in a run folder), what a kill left half-swapped is undone.

A run is the same run while its stage's `config()` and its modules' specs stay the same: that
identity is saved with every checkpoint, and a checkpoint or final/ of another identity is never
resumed. Asking for more steps is not another identity: it continues the run. A rerun resumes
weights, optimizer moments, step and RNG states; the optimizers' hyperparameters (lr...) are
those the stage builds now.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
from filelock import FileLock, Timeout

from ..files import atomic_write
from ..layout import CURVES
from ..saved import (CONFIG, FINAL, CheckpointMismatch, fsync, jsonable, load_weights, read_json, recover, spec_of,
                     staging, write_model)
from .distributed import Distributed, seed_everything

CHECKPOINT = "checkpoint"
OPTIMIZER = "optimizer.pt"
METRICS = "metrics.json"
HISTORY = "history.jsonl"  # one line per logged step; a resumed run appends (read the last line per step)
PREVIOUS = "previous"
LOCK = ".train.lock"


def identity(stage) -> dict:
    """What makes a run this run: the stage's config() and what builds its modules."""
    return {"config": jsonable(stage.config(), f"{stage.name} stage config()"),
            "models": {name: spec_of(m) for name, m in stage.modules.items()}}


@contextlib.contextmanager
def exclusive(run_dir: Path, d: Distributed) -> Iterator[None]:
    """Rank 0 locks the run folder (one training process per folder, so anything half-written
    there is a dead process's) and tidies what a kill left behind; the other ranks wait."""
    lock = None
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(run_dir / LOCK, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RuntimeError(f"another process is training in {run_dir} (it holds {run_dir / LOCK})") from None
    try:
        if d.main:
            for name in (CHECKPOINT, FINAL):
                recover(run_dir, name)
        d.barrier()
        yield
    finally:
        if lock is not None:
            lock.release()


def finished(run_dir: Path, stage_name: str, ident: dict, steps: int) -> dict | None:
    """The metrics of a final/ of this run that holds `steps` steps; None if there is none yet."""
    final = read_json(run_dir / FINAL / CONFIG)
    if final is None:
        return None
    check_same(final, stage_name, ident, run_dir / FINAL)
    if final["step"] > steps:
        raise CheckpointMismatch(f"{run_dir / FINAL} holds {final['step']} steps, more than the {steps} asked for")
    return (read_json(run_dir / METRICS) or final["metrics"]) if final["step"] == steps else None


def resume(run_dir: Path, stage_name: str, ident: dict, steps: int, modules, optimizers, d: Distributed,
           seed: int) -> tuple[int, list[int], dict]:
    """Load the run's checkpoint into the modules, optimizers and RNGs, or seed a fresh run;
    (the step to start from, the steps resumed from so far, the last logged losses)."""
    folder = run_dir / CHECKPOINT
    info = read_json(folder / CONFIG)
    if info is None:
        seed_everything(seed + d.rank)
        return 0, [], {}
    check_same(info, stage_name, ident, folder)
    if info["step"] > steps:
        raise CheckpointMismatch(f"{folder} is at step {info['step']}, beyond the {steps} steps asked for")
    load_weights(folder, modules, d.device)
    state = torch.load(folder / OPTIMIZER, map_location="cpu", weights_only=True)
    if state["step"] != info["step"]:
        raise CheckpointMismatch(f"{folder}: {OPTIMIZER} is at step {state['step']} but {CONFIG} at {info['step']}")
    if set(state["optimizers"]) != set(optimizers):
        raise CheckpointMismatch(f"{folder} holds optimizers for phases {sorted(state['optimizers'])}, the stage has "
                                 f"{sorted(optimizers)}: delete {run_dir} to train from scratch")
    for phase, opt in optimizers.items():
        # Moments come from the checkpoint; hyperparameters (lr, betas...) from the stage as built now.
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt.load_state_dict(state["optimizers"][phase])
        for group, h in zip(opt.param_groups, hyper):
            group.update(h)
    if d.rank < len(state["rng"]):
        _set_rng_state(state["rng"][d.rank], d.device)
    else:  # more ranks than the checkpoint was written by
        seed_everything(seed + d.rank + 7919 * info["step"])
    return info["step"], info["resumed_from"] + [info["step"]], info["losses"]


def save_checkpoint(run_dir: Path, info: dict, modules, optimizers, d: Distributed) -> None:
    """Every rank's RNG state, and on rank 0 the checkpoint folder; `info` describes the run."""
    rng = d.gather(_rng_state(d.device))
    if d.main:
        with staging(run_dir, CHECKPOINT) as tmp:
            state = {"step": info["step"], "optimizers": {k: o.state_dict() for k, o in optimizers.items()}, "rng": rng}
            torch.save(state, tmp / OPTIMIZER)
            fsync(tmp / OPTIMIZER)
            write_model(tmp, info, modules)  # config.json last: a folder with it is complete
    d.barrier()


def history(run_dir: Path) -> list[dict]:
    """Logged losses of a run, the last record of each step (a resumed run repeats steps)."""
    records: dict[int, dict] = {}
    path = run_dir / HISTORY
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            records[record["step"]] = record
    return [records[s] for s in sorted(records)]


def write_final(run_dir: Path, info: dict, modules, metrics: dict) -> None:
    """metrics.json, curves.json and final/ (rank 0 alone)."""
    atomic_write(run_dir / METRICS, (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())
    records = history(run_dir)
    fields = list(dict.fromkeys(k for r in records for k in r))  # dvc plots reads the fields of the first
    curves = [{k: r.get(k) for k in fields} for r in records]  # record alone: null where a step lacks one
    atomic_write(run_dir / CURVES, (json.dumps(curves, indent=1) + "\n").encode())
    with staging(run_dir, FINAL) as tmp:
        write_model(tmp, {k: v for k, v in info.items() if k != "losses"} | {"metrics": metrics}, modules)


def check_same(saved: Mapping, stage_name: str, ident: dict, where: Path) -> None:
    """A saved run of another stage or identity is an error naming the differing keys."""
    if saved.get("stage") != stage_name:
        raise CheckpointMismatch(f"{where} holds stage {saved.get('stage')!r}, not {stage_name!r}: "
                                 f"use another run folder than {where.parent}")
    old = _flatten({"config": saved.get("config", {}), "models": saved.get("models", {})})
    new, missing = _flatten(ident), object()
    keys = sorted(k for k in old.keys() | new.keys()
                  if old.get(k, missing) != new.get(k, missing) and k.rsplit(".", 1)[-1] != "steps")
    if keys:
        diffs = "; ".join(f"{k}: saved {old.get(k, '(absent)')!r}, now {new.get(k, '(absent)')!r}" for k in keys)
        raise CheckpointMismatch(
            f"{where} was trained with another {stage_name} configuration (differing keys: {diffs}). "
            f"It will not be resumed as a different model: delete {where.parent} to train this "
            "configuration from scratch, or restore the saved values to resume it."
        )


def set_aside_if_changed(run_dir: Path, stage_name: str, ident: dict) -> None:
    """Move a run of another identity to <run_dir>/previous/ (replacing an older one)."""
    try:
        for name in (FINAL, CHECKPOINT):
            info = read_json(run_dir / name / CONFIG)
            if info is not None:
                check_same(info, stage_name, ident, run_dir / name)
    except CheckpointMismatch as exc:
        previous = run_dir / PREVIOUS
        shutil.rmtree(previous, ignore_errors=True)
        previous.mkdir()
        for name in (FINAL, CHECKPOINT, METRICS, HISTORY, CURVES):
            if (run_dir / name).exists():
                os.rename(run_dir / name, previous / name)
        fsync(run_dir)
        print(f"{stage_name}: configuration changed, training afresh; the old run is in {previous} ({exc})",
              file=sys.stderr)


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _rng_state(device: torch.device) -> dict:
    """This rank's RNG states as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), py_gauss],
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
