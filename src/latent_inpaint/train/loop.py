"""The one training loop that every stage of the method uses.

A stage (VQGAN, restrictive encoder, transformer, decoder) supplies its modules, optimizers,
batches and losses through the `Stage` protocol; `train` does the rest: device placement, DDP
under torchrun, bf16 autocast, gradient accumulation, logging, pictures, evaluation, atomic
checkpoints, resume, and a clean stop on SIGTERM or Ctrl-C.

One step, for each phase (optimizer) in the order the stage lists them:

    for each of the step's grad_accum micro-batches (the same ones for every phase):
        loss = stage.loss(phase, ...) / grad_accum; loss.backward()   # DDP syncs on the last
    optimizer.step(); optimizer.zero_grad(set_to_none=True)

During a phase only that phase's parameters require grad (as Lightning's toggle_optimizer does
for GANs), and `modules` maps a module to its DDP wrapper only in the phases that train it;
elsewhere the loss sees the bare module, so a discriminator called in the generator's phase
passes gradients to its input without touching its own weights or DDP's bookkeeping.

A run folder holds:

    <run_dir>/checkpoint/         the latest complete checkpoint (what a rerun resumes from)
        <module>.safetensors      weights of each module in `stage.modules`
        optimizer.pt              optimizer states, step, and every rank's torch/numpy/python RNG
        config.json               {"stage", "config": stage.config(), "step", "steps",
                                   "world_size", "resumed_from", "losses", "files": {file: sha256}}
    <run_dir>/final/              the stage's output, what later stages load (load_stage_weights)
        <module>.safetensors
        config.json               as above, with "metrics" for "losses", and "rank_digests"
                                  (one parameter digest per rank, checked equal)
    <run_dir>/metrics.json        the final numbers: {"step", "world_size", "train", "eval"}
    <run_dir>/history.jsonl       the logged losses, one JSON line per logged step (the curves)

A folder is replaced by renames, so a kill at any instant leaves a complete copy:

    1. write every file into <name>.tmp-<pid>, fsync each file and the folder (config.json last)
    2. rename <name> -> <name>.old                  (if <name> exists)
    3. rename <name>.tmp-<pid> -> <name>, fsync the run folder
    4. delete <name>.old

At start-up (under a lock file, so only one process trains in a run folder) leftover
<name>.tmp-* folders are deleted, and <name>.old is deleted if <name> exists (killed in step 4)
or renamed back to <name> if it does not (killed between steps 2 and 3).

A rerun resumes weights, optimizer moments, step and RNG states; the optimizers' hyperparameters
(lr...) are those the stage builds now, and the batch stream restarts from a seed derived from
the resume step rather than replaying its first batches. A different `stage.config()` is an error.

SIGTERM (SLURM preemption; torchrun forwards the one it gets) or Ctrl-C finishes the current step,
writes a checkpoint and raises `TrainingInterrupted` (exit status 128 + signal). SLURM and
torchrun send SIGKILL about 30 s later, so a checkpoint must be written within that; on SLURM
`--signal=TERM@120` gives earlier notice. SIGKILL itself cannot be caught: the periodic
checkpoints bound what it loses. Logged losses are rank 0's; throughput counts all ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ..config import TrackingConfig, TrainConfig
from ..files import atomic_write, sha256_file
from ..tracking import stage_run
from .distributed import Distributed, unwrap

PREVIOUS = "previous"
HISTORY = "history.jsonl"  # one line per logged step; a resumed run appends (read the last line per step)
CHECKPOINT = "checkpoint"
FINAL = "final"
CONFIG = "config.json"
OPTIMIZER = "optimizer.pt"
METRICS = "metrics.json"
LOCK = ".train.lock"
WEIGHTS = ".safetensors"


class Stage(Protocol):
    """What a stage supplies to `train`. Optional extras, looked up with getattr:

    - `frozen: dict[str, nn.Module]`: helpers moved to the device and used in eval mode without
      gradients (e.g. the trained VQGAN that tokenizes images for the transformer); they are in
      the `modules` mapping the hooks receive but are never saved.
    - `counts(batch) -> dict[str, int]`: what a micro-batch holds, e.g. {"images": 8,
      "tokens": 2048}, logged as `<key>_per_s` over all ranks. Default: {"images": the first
      tensor's leading size}.
    - `lr_factor(phase, step) -> float`: a schedule; each group's lr becomes its initial lr
      times this factor. Default: the optimizers' lr stays as built.
    - `find_unused_parameters: bool`: passed to DDP, for a module with parameters that some
      step leaves out of its loss.
    """

    name: str  # "vqgan", "encoder", ...; names the tracking metrics
    modules: dict[str, nn.Module]  # everything trained and saved, e.g. {"vqgan": ..., "disc": ...}

    def optimizers(self, modules: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        """The phases, in order: e.g. {"vqgan": opt_g, "disc": opt_d}. Called once the modules
        are on the device; for the VQGAN stage build the lr with `scaled_lr`."""

    def batches(self, rank: int, world_size: int, seed: int) -> Iterator[Any]:
        """An endless stream of this rank's micro-batches on the CPU: tensors, or dicts, lists or
        tuples of them. `seed` changes when a run resumes, so a resumed run reads a fresh order."""

    def loss(
        self, phase: str, modules: dict[str, nn.Module], batch: Any, step: int, scratch: dict
    ) -> tuple[torch.Tensor | None, dict[str, float | torch.Tensor]]:
        """The phase's mean-reduced scalar loss for one micro-batch, and numbers to log.

        None skips the phase at this step (e.g. the discriminator before disc_start): it must be
        None for all micro-batches of the step, and decided before a trained module is called
        (DDP expects a backward after every forward of a wrapped module). Call each module this
        phase trains once per micro-batch, through its `forward`. `scratch` is one dict per
        micro-batch, shared by its phases (e.g. the generator phase leaves the detached
        reconstruction there for the discriminator). `step` counts the optimizer steps done.
        """

    def pictures(self, modules: dict[str, nn.Module], batch: Any) -> Any:
        """A PIL image or (H, W, 3) uint8 array for the tracker every `image_every` steps, or
        None. Runs on rank 0 in eval mode, without gradients, under the training autocast."""

    def evaluate(self, modules: dict[str, nn.Module]) -> dict[str, float]:
        """Validation metrics, at every checkpoint and at the end; like `pictures`."""

    def config(self) -> dict:
        """JSON-able description of what builds `modules`, saved with the weights. A checkpoint
        whose config differs is never resumed."""


def loop_settings(cfg: TrainConfig) -> dict:
    """The train settings that change what a run learns (not how often it logs or saves), for a
    stage's config(): a run is resumed only under the same ones."""
    return {"seed": cfg.seed, "grad_accum": cfg.grad_accum, "precision": cfg.precision}


def scaled_lr(base_lr: float, batch_size: int, world_size: int, grad_accum: int = 1) -> float:
    """taming-transformers' rule for the VQGAN: lr = base_lr x batch size x GPUs x accumulation,
    i.e. base_lr per image of the effective batch (4.5e-6 x 12 x 8 = 4.32e-4 in its configs).
    `world_size` before `train` starts: `latent_inpaint.train.world_size()`."""
    return base_lr * batch_size * world_size * grad_accum


class CheckpointMismatch(ValueError):
    """A saved checkpoint or output does not match the stage trying to use it."""


class TrainingInterrupted(SystemExit):
    """SIGTERM or Ctrl-C: a checkpoint was written, a rerun resumes; exits with 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(128 + signum)
        self.message = message

    def __str__(self) -> str:
        return self.message


# ---------------------------------------------------------------------------------- the loop


def train(
    stage: Stage,
    cfg: TrainConfig,
    steps: int,
    run_dir: str | os.PathLike,
    tracking: TrackingConfig,
    params: Mapping[str, Any],
    *,
    device: str | torch.device | None = None,
    restart_on_change: bool = False,
) -> dict:
    """Train `stage` for `steps` optimizer steps in `run_dir`, resuming from its checkpoint;
    return the final metrics (those of metrics.json). Rank 0 logs to `tracking` under
    `stage.name`, with `params` as the run's parameters. `device` None: the local GPU if any,
    else the CPU. A run folder whose final/ already holds `steps` steps returns at once.

    A run folder trained with another `stage.config()` is an error, unless `restart_on_change`
    (what the pipeline's rules use: they rerun a stage because its parameters changed): then its
    checkpoint, final/ and metrics move to <run_dir>/previous/ and training starts afresh."""
    run_dir = Path(run_dir)
    d = Distributed.start(device)
    try:
        with _exclusive(run_dir, d):
            if restart_on_change and d.main:
                _set_aside_if_changed(run_dir, stage.name, _jsonable(stage.config(), f"{stage.name} config()"))
            d.barrier()
            return _train(stage, cfg, steps, run_dir, tracking, params, d)
    finally:
        d.close()


def _train(stage, cfg, steps, run_dir, tracking, params, d: Distributed) -> dict:
    config = _jsonable(stage.config(), f"{stage.name} stage config()")
    final = _read_json(run_dir / FINAL / CONFIG)
    if final is not None:
        _check_same(final, stage.name, config, run_dir / FINAL)
        if final["step"] == steps:
            return _read_json(run_dir / METRICS) or final["metrics"]
        if final["step"] > steps:
            raise CheckpointMismatch(f"{run_dir / FINAL} holds {final['step']} steps, more than the {steps} asked for")

    modules, frozen = stage.modules, getattr(stage, "frozen", {})
    for m in modules.values():
        m.to(d.device).train()
    for m in frozen.values():
        m.to(d.device).eval().requires_grad_(False)
    optimizers = stage.optimizers(modules)
    for opt in optimizers.values():
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])

    start, resumed_from, losses = 0, [], {}
    saved = _read_json(run_dir / CHECKPOINT / CONFIG)
    if saved is not None:
        _check_same(saved, stage.name, config, run_dir / CHECKPOINT)
        if saved["step"] > steps:
            raise CheckpointMismatch(
                f"{run_dir / CHECKPOINT} is at step {saved['step']}, beyond the {steps} steps asked for"
            )
        _load_checkpoint(run_dir / CHECKPOINT, saved, modules, optimizers, d, cfg.seed)
        start, resumed_from, losses = saved["step"], saved["resumed_from"] + [saved["step"]], saved["losses"]
    else:
        seed_everything(cfg.seed + d.rank)

    unused = getattr(stage, "find_unused_parameters", False)
    wrapped = {n: d.wrap(m, unused) for n, m in modules.items()}
    every = {**frozen, **modules}  # what pictures() and evaluate() see
    phases = {}  # phase -> (ids of its parameters, modules as its loss sees them, its DDP wrappers)
    for phase, opt in optimizers.items():
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        view = {n: wrapped[n] if any(id(p) in ids for p in m.parameters()) else m for n, m in modules.items()}
        phases[phase] = (ids, {**frozen, **view}, [m for m in view.values() if isinstance(m, DDP)])
    trained = [p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]

    autocast = _autocast(cfg.precision, d.device)
    batches = iter(stage.batches(d.rank, d.world_size, _data_seed(cfg.seed, start)))
    if not d.main:
        tracking = dataclasses.replace(tracking, enabled=False)
    meter, log_time = _Meter(), 0.0

    with (
        _StopRequests() as stop,
        stage_run(stage.name, tracking, params) as tracker,
        tqdm(total=steps, initial=start, desc=stage.name, disable=not d.main, dynamic_ncols=True,
             mininterval=0.1 if sys.stderr.isatty() else 30.0) as bar,
    ):  # fmt: skip
        if start:
            tracker.log_metrics({"resumed_from_step": start}, step=start)
        for step in range(start, steps):
            t0 = time.perf_counter()
            micro = [_to_device(next(batches), d.device) for _ in range(cfg.grad_accum)]
            scratch = [{} for _ in micro]
            for phase, opt in optimizers.items():
                ids, view, ddp = phases[phase]
                lr_factor = getattr(stage, "lr_factor", None)
                if lr_factor is not None:
                    for group in opt.param_groups:
                        group["lr"] = group["initial_lr"] * lr_factor(phase, step)
                with _only_trainable(trained, ids):
                    stepped = _accumulate(stage, phase, view, ddp, micro, scratch, step, autocast, meter)
                if stepped:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            for batch in micro:
                meter.count(_counts(stage, batch))
            done = step + 1
            bar.update(1)

            if done % cfg.log_every == 0 or done == steps:
                losses = meter.means()  # reads the tensors: waits for the GPU
                log_time += time.perf_counter() - t0
                rates = {f"{k}_per_s": n * d.world_size / log_time for k, n in meter.counts.items()}
                lrs = {f"lr/{phase}": opt.param_groups[0]["lr"] for phase, opt in optimizers.items()}
                losses.update(rates)
                tracker.log_metrics({**losses, **lrs}, step=done)
                if d.main:  # training curves for the report, with or without a tracking server
                    with open(run_dir / HISTORY, "a") as f:
                        f.write(json.dumps({"step": done, **losses, **lrs}) + "\n")
                bar.set_postfix(
                    {k.removeprefix("loss/"): f"{v:.4g}" for k, v in losses.items() if k.startswith("loss/")},
                    refresh=False,
                )
                meter, log_time = _Meter(), 0.0
            else:
                log_time += time.perf_counter() - t0

            if d.main and tracker.enabled and tracking.log_images and done % cfg.image_every == 0:
                with _inference(every.values(), autocast):
                    picture = stage.pictures(every, micro[0])
                if picture is not None:
                    tracker.log_image(picture, f"pictures/step{done:07d}")

            signum = None
            if d.any(stop.signum is not None):
                signum = next(s for s in d.gather(stop.signum) if s is not None)
            if done % cfg.checkpoint_every == 0 and done != steps and signum is None:
                _evaluate(stage, every, autocast, d, tracker, done)
            if done % cfg.checkpoint_every == 0 or done == steps or signum is not None:
                _save_checkpoint(run_dir, stage.name, config, modules, optimizers, done, steps, d, resumed_from, losses)
            if signum is not None:
                message = (
                    f"{signal.Signals(signum).name}: stopped {stage.name} training at step {done} of {steps}; "
                    f"checkpoint written to {run_dir / CHECKPOINT}. Rerun the same command to resume."
                )
                if d.main:
                    bar.write(message, file=sys.stderr)
                raise TrainingInterrupted(message, signum)

        eval_metrics = _evaluate(stage, every, autocast, d, tracker, steps)
        digests = d.gather(param_digest(modules))
        if len(set(digests)) > 1:
            raise RuntimeError(
                f"{stage.name}: the {d.world_size} ranks finished with different weights (parameter "
                f"digests {digests}); DDP did not keep them in sync, so final/ is not written"
            )
        metrics = {"step": steps, "world_size": d.world_size, "train": losses, "eval": eval_metrics}
        if d.main:
            atomic_write(run_dir / METRICS, (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())
            with _staging(run_dir, FINAL) as tmp:
                info = _info(stage.name, config, steps, steps, d, resumed_from, losses)
                del info["losses"]  # in metrics
                info.update(metrics=metrics, rank_digests=digests, files=_write_weights(tmp, modules))
                _write_json(tmp / CONFIG, info)
            tracker.log_dict(metrics, METRICS)
        return d.broadcast(metrics)  # rank 0 alone evaluated


def _accumulate(stage, phase, view, ddp, micro, scratch, step, autocast, meter) -> bool:
    """One phase's gradients summed over the step's micro-batches; False if it skipped."""
    skipped = []
    for i, batch in enumerate(micro):
        with contextlib.ExitStack() as no_sync:
            if i < len(micro) - 1:  # DDP all-reduces the gradients on the last backward only
                for m in ddp:
                    no_sync.enter_context(m.no_sync())
            with autocast():
                loss, logs = stage.loss(phase, view, batch, step, scratch[i])
            if loss is not None:
                (loss / len(micro)).backward()
                meter.add({f"loss/{phase}": loss})
        meter.add(logs)
        skipped.append(loss is None)
    if any(skipped) and not all(skipped):
        raise ValueError(
            f"stage {stage.name}, phase {phase}, step {step}: loss() returned None for some "
            "micro-batches but not all; skip a phase for the whole step or not at all"
        )
    return not skipped[0]


class _Meter:
    """Sums of logged numbers since the last log. Tensors stay on the device until `means`."""

    def __init__(self):
        self.sums, self.n, self.counts = {}, {}, {}

    def add(self, values: Mapping[str, float | torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.n[k] = self.n.get(k, 0) + 1

    def count(self, counts: Mapping[str, int]) -> None:
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v

    def means(self) -> dict[str, float]:
        return {k: float(s) / self.n[k] for k, s in self.sums.items()}


def _evaluate(stage, every, autocast, d: Distributed, tracker, step: int) -> dict[str, float]:
    """Rank 0 evaluates while the others wait at the next collective."""
    if not d.main:
        return {}
    with _inference(every.values(), autocast):
        metrics = {k: float(v) for k, v in stage.evaluate(every).items()}
    tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    return metrics


@contextlib.contextmanager
def _inference(modules, autocast) -> Iterator[None]:
    """Eval mode, no gradients, and the RNGs put back after, so that logging pictures or
    evaluating does not change what training draws."""
    modes = [(m, m.training) for m in modules]
    np_state, py_state = np.random.get_state(), random.getstate()
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad(), autocast():
        for m, _ in modes:
            m.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.train(mode)
            np.random.set_state(np_state)
            random.setstate(py_state)


@contextlib.contextmanager
def _only_trainable(params: list[nn.Parameter], ids: set[int]) -> Iterator[None]:
    """Only the current phase's parameters require grad, so its backward fills no other
    phase's gradients."""
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(id(p) in ids)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


class _StopRequests:
    """SIGINT and SIGTERM (SLURM's preemption notice) ask for a checkpoint and a stop after the
    current step; a second Ctrl-C stops at once."""

    def __enter__(self):
        self.signum = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _autocast(precision: str, device: torch.device):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _counts(stage, batch) -> dict[str, int]:
    counts = getattr(stage, "counts", None)
    if counts is not None:
        return counts(batch)
    first = _first_tensor(batch)
    return {"images": first.shape[0]} if first is not None and first.ndim else {}


def _first_tensor(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _data_seed(seed: int, start: int) -> int:
    """The batch stream's seed: `seed` for a fresh run, another one for each resume point, so a
    resumed run does not read the first batches again."""
    return seed if start == 0 else (seed * 1_000_003 + start) % 2**31


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random. Also called before a stage builds its modules, so that the
    same train.seed gives the same initial weights (DDP then broadcasts rank 0's anyway)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def param_digest(modules: Mapping[str, nn.Module]) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes. Buffers are left out: DDP
    keeps those in step only at the start of each forward (BatchNorm statistics drift)."""
    h = hashlib.sha256()
    for name in sorted(modules):
        for pname, p in unwrap(modules[name]).named_parameters():
            t = p.detach().cpu().contiguous()
            h.update(f"{name}.{pname}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- checkpoints


def export_final(run_dir: str | os.PathLike, stage_name: str, config: dict, modules: Mapping[str, nn.Module],
                 source: str) -> Path:
    """Write weights that were not trained here (an imported checkpoint) as a stage's final/,
    in the layout `load_stage_weights` reads, atomically; `source` says where they came from."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _recover(run_dir, FINAL)
    with _staging(run_dir, FINAL) as tmp:
        info = {"stage": stage_name, "config": _jsonable(config, f"{stage_name} config"), "step": 0, "steps": 0,
                "imported_from": source, "torch": torch.__version__, "files": _write_weights(tmp, modules)}
        _write_json(tmp / CONFIG, info)
    return run_dir / FINAL


def load_stage_weights(path: str | os.PathLike, modules: Mapping[str, nn.Module], device="cpu") -> dict:
    """Load each of `modules` strictly from a stage's saved weights; return its config.json.

    `path` is a run folder (its final/ is read), a final/ or a checkpoint/ folder. The folder may
    hold more modules than asked for (a decoder needs the VQGAN, not its discriminator); each
    module asked for must be there, intact (sha256), with exactly the module's keys and shapes.
    """
    path = Path(path)
    if not (path / CONFIG).is_file() and (path / FINAL / CONFIG).is_file():
        path = path / FINAL
    info = _read_json(path / CONFIG)
    if info is None:
        raise FileNotFoundError(f"no trained weights in {path}: {CONFIG} is missing (has the stage run to the end?)")
    _load_weights(path, info, modules, device)
    return info


@contextlib.contextmanager
def _exclusive(run_dir: Path, d: Distributed) -> Iterator[None]:
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
                _recover(run_dir, name)
        d.barrier()
        yield
    finally:
        if lock is not None:
            lock.release()


def _recover(run_dir: Path, name: str) -> None:
    """Finish or undo a folder swap that a kill interrupted (see the module docstring)."""
    for tmp in run_dir.glob(f"{name}.tmp-*"):
        shutil.rmtree(tmp)
    target, old = run_dir / name, run_dir / f"{name}.old"
    if old.exists():
        if target.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, target)
            _fsync_dir(run_dir)


@contextlib.contextmanager
def _staging(run_dir: Path, name: str) -> Iterator[Path]:
    """A fresh folder to fill; on leaving, it replaces <run_dir>/<name> by the rename protocol."""
    tmp, target, old = run_dir / f"{name}.tmp-{os.getpid()}", run_dir / name, run_dir / f"{name}.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old.exists():
        shutil.rmtree(old)  # a finished swap's leftover: <name> is complete
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync_dir(run_dir)
    if old.exists():
        shutil.rmtree(old)


def _save_checkpoint(run_dir, stage_name, config, modules, optimizers, step, steps, d, resumed_from, losses):
    rng = d.gather(_rng_state(d.device))
    if d.main:
        with _staging(run_dir, CHECKPOINT) as tmp:
            files = _write_weights(tmp, modules)
            state = {"step": step, "optimizers": {k: o.state_dict() for k, o in optimizers.items()}, "rng": rng}
            with open(tmp / OPTIMIZER, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            info = _info(stage_name, config, step, steps, d, resumed_from, losses)
            info["files"] = files
            _write_json(tmp / CONFIG, info)  # last: a folder with config.json is complete
    d.barrier()


def _info(stage_name, config, step, steps, d, resumed_from, losses) -> dict:
    return {
        "stage": stage_name,
        "config": config,
        "step": step,
        "steps": steps,
        "world_size": d.world_size,
        "resumed_from": resumed_from,
        "losses": losses,
        "torch": torch.__version__,
    }


def _load_checkpoint(folder: Path, info: dict, modules, optimizers, d: Distributed, seed: int) -> None:
    _load_weights(folder, info, modules, d.device)
    state = torch.load(folder / OPTIMIZER, map_location="cpu", weights_only=True)
    if state["step"] != info["step"]:
        raise CheckpointMismatch(f"{folder}: {OPTIMIZER} is at step {state['step']} but {CONFIG} at {info['step']}")
    if set(state["optimizers"]) != set(optimizers):
        raise CheckpointMismatch(
            f"{folder} holds optimizers for phases {sorted(state['optimizers'])}, the stage has "
            f"{sorted(optimizers)}: delete {folder.parent} to train from scratch"
        )
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


def _write_weights(folder: Path, modules: Mapping[str, nn.Module]) -> dict[str, str]:
    """<module>.safetensors for each module (contiguous CPU tensors; tied weights stored once);
    returns {file name: sha256}."""
    from safetensors.torch import save_model

    files = {}
    for name, module in modules.items():
        path = folder / f"{name}{WEIGHTS}"
        save_model(unwrap(module), str(path))
        os.chmod(path, stat.S_IMODE(folder.stat().st_mode) & 0o666)  # safetensors writes 0600
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        files[path.name] = sha256_file(path)
    return files


def _load_weights(folder: Path, info: dict, modules: Mapping[str, nn.Module], device) -> None:
    from safetensors.torch import load_model

    files = info.get("files", {})
    for name, module in modules.items():
        fname = f"{name}{WEIGHTS}"
        if fname not in files:
            held = sorted(f.removesuffix(WEIGHTS) for f in files)
            raise CheckpointMismatch(f"{folder} holds no weights for module {name!r} (it holds {held})")
        if sha256_file(folder / fname) != files[fname]:
            raise CheckpointMismatch(f"{folder / fname} is corrupt: its sha256 differs from {folder / CONFIG}")
        try:
            load_model(unwrap(module), folder / fname, strict=True, device=str(device))
        except RuntimeError as exc:
            raise CheckpointMismatch(f"{folder / fname} does not fit module {name!r}: {exc}") from exc


def _check_same(saved: dict, stage_name: str, config: dict, where: Path) -> None:
    """A saved run of another stage or configuration is an error naming the differing keys."""
    if saved.get("stage") != stage_name:
        raise CheckpointMismatch(
            f"{where} holds stage {saved.get('stage')!r}, not {stage_name!r}: "
            f"use another run folder than {where.parent}"
        )
    old, new = _flatten(saved["config"]), _flatten(config)
    missing = object()
    # A step count never identifies a model: asking for more steps continues the run.
    keys = sorted(k for k in old.keys() | new.keys()
                  if old.get(k, missing) != new.get(k, missing) and k.rsplit(".", 1)[-1] != "steps")
    if keys:
        diffs = "; ".join(f"{k}: saved {old.get(k, '(absent)')!r}, now {new.get(k, '(absent)')!r}" for k in keys)
        raise CheckpointMismatch(
            f"{where} was trained with another {stage_name} configuration (differing keys: {diffs}). "
            f"It will not be resumed as a different model: delete {where.parent} to train this "
            "configuration from scratch, or restore the saved values to resume it."
        )


def _set_aside_if_changed(run_dir: Path, stage_name: str, config: dict) -> None:
    """Move a run of another configuration to <run_dir>/previous/ (replacing an older one)."""
    saved = [(name, _read_json(run_dir / name / CONFIG)) for name in (FINAL, CHECKPOINT)]
    try:
        for name, info in saved:
            if info is not None:
                _check_same(info, stage_name, config, run_dir / name)
    except CheckpointMismatch as exc:
        previous = run_dir / PREVIOUS
        shutil.rmtree(previous, ignore_errors=True)
        previous.mkdir()
        for name in (FINAL, CHECKPOINT, METRICS, HISTORY):
            if (run_dir / name).exists():
                os.rename(run_dir / name, previous / name)
        _fsync_dir(run_dir)
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


def _jsonable(value, what: str):
    """`value` as it reads back from JSON (tuples become lists), so saved and current compare."""
    try:
        return json.loads(json.dumps(value))
    except TypeError as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _write_json(path: Path, data) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
