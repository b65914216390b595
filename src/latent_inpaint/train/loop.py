"""The one training loop that every stage of the method uses.

A stage (VQGAN, restrictive encoder, transformer, decoder) supplies its modules, optimizers,
batches and losses through the `Stage` protocol; `train` does the rest: device placement, DDP
under torchrun, autocast (bf16, or fp16 with a gradient scaler: step.precision_for), gradient accumulation, logging, pictures, evaluation, atomic
checkpoints, resume, and a clean stop on SIGTERM or Ctrl-C. The run folder's layout and resume
rules are in `checkpoint.py`; ranks, seeds and signals in `distributed.py`.

One step, for each phase (optimizer) in the order the stage lists them:

    for each of the step's grad_accum micro-batches (the same ones for every phase):
        loss = stage.loss(phase, ...) / grad_accum; scaler.scale(loss).backward()   # DDP syncs on the last
    scaler.step(optimizer); optimizer.zero_grad(set_to_none=True)
then scaler.update() (the GradScaler passes through except under fp16)

During a phase only that phase's parameters require grad (as Lightning's toggle_optimizer does
for GANs), and `modules` maps a module to its DDP wrapper only in the phases that train it;
elsewhere the loss sees the bare module, so a discriminator called in the generator's phase
passes gradients to its input without touching its own weights or DDP's bookkeeping. A wrapper
reads its module's attributes through, so stage code never unwraps.

A rerun resumes (checkpoint.py), its batch stream from a seed derived from the resume step
rather than replaying its first batches. SIGTERM or Ctrl-C finishes the current step, writes a
checkpoint and raises `TrainingInterrupted` (distributed.StopRequests). Logged losses are rank
0's; throughput counts all ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch
from torch import nn
from tqdm import tqdm

from ..config import TrackingConfig, TrainConfig, section, to_dict
from ..saved import FINAL
from ..tracking import stage_run, tracking_config
from .checkpoint import (CHECKPOINT, HISTORY, exclusive, finished, identity, resume, save_checkpoint,
                         set_aside_if_changed, write_final)
from .distributed import DDP, Distributed, StopRequests, param_digest, seed_everything
from ..precision import device_precision, precision_for
from .step import Meter, counts, inference, only_trainable, to_device


class Stage(Protocol):
    """What a stage supplies to `train`. Optional extras, looked up with getattr:

    - `frozen: dict[str, nn.Module]`: helpers moved to the device and used in eval mode without
      gradients (e.g. LPIPS); they are in the `modules` mapping the hooks receive, never saved.
    - `initialize(modules, batch)`: on a fresh run, before DDP wraps the modules, with this
      rank's first micro-batch on the device, without gradients; DDP then copies rank 0's
      weights to every rank (e.g. a codebook drawn from the first batch's encoder outputs).
    - `counts(batch) -> dict[str, int]`: what a micro-batch holds, e.g. {"images": 8,
      "tokens": 2048}, logged as `<key>_per_s` over all ranks. Default: {"images": the first
      tensor's leading size}.
    - `lr_factor(phase, step) -> float`: a schedule; each group's lr becomes its initial lr
      times this factor. Default: the optimizers' lr stays as built.
    - `find_unused_parameters: bool`: passed to DDP, for a module with parameters that some
      step leaves out of its loss.
    """

    name: str  # "vqgan", "encoder", ...; names the tracking metrics
    # Everything trained and saved, e.g. {"vqgan": ..., "disc": ...}; each has a `spec()`.
    modules: dict[str, nn.Module]

    def optimizers(self, modules: dict[str, nn.Module], world_size: int) -> dict[str, torch.optim.Optimizer]:
        """The phases, in order: e.g. {"vqgan": opt_g, "disc": opt_d}. Called once the modules
        are on the device; `world_size` ranks train together (the VQGAN scales its lr by it)."""

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
        """JSON-able description of what the run learns from beyond its modules' specs (data,
        loop settings...). A checkpoint whose config or specs differ is never resumed."""


def loop_settings(cfg: TrainConfig) -> dict:
    """The train settings that change what a run learns (not how often it logs or saves), for a
    stage's config(): a run is resumed only under the same ones."""
    return {"seed": cfg.seed, "grad_accum": cfg.grad_accum, "precision": cfg.precision}


def scaled_lr(base_lr: float, batch_size: int, world_size: int, grad_accum: int = 1) -> float:
    """taming-transformers' rule for the VQGAN: lr = base_lr x batch size x GPUs x accumulation,
    i.e. base_lr per image of the effective batch (4.5e-6 x 12 x 8 = 4.32e-4 in its configs)."""
    return base_lr * batch_size * world_size * grad_accum


class TrainingInterrupted(SystemExit):
    """SIGTERM or Ctrl-C: a checkpoint was written, a rerun resumes; exits with 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(128 + signum)
        self.message = message

    def __str__(self) -> str:
        return self.message


def run(build_stage: Callable[[], Stage], steps: int, params: Mapping, sections: Mapping, run_dir: Path, *,
        device: str | None = None, restart_on_change: bool = False) -> str:
    """Build a stage under train.seed (its initial weights are part of the run), train it with the
    params' train and tracking settings, logging `sections` (and train) as the run's params;
    a one-line summary."""
    cfg = section(params, "train")
    seed_everything(cfg.seed)
    stage = build_stage()
    metrics = train(stage, cfg, steps, run_dir, tracking_config(params), {**sections, "train": to_dict(cfg)},
                    device=device, restart_on_change=restart_on_change)
    return (f"{stage.name} trained for {metrics['step']} steps in {run_dir}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in metrics["eval"].items()))


# ---------------------------------------------------------------------------------- the loop


def train(stage: Stage, cfg: TrainConfig, steps: int, run_dir: str | os.PathLike, tracking: TrackingConfig,
          params: Mapping[str, Any], *, device: str | torch.device | None = None,
          restart_on_change: bool = False) -> dict:
    """Train `stage` for `steps` optimizer steps in `run_dir`, resuming from its checkpoint;
    return the final metrics (those of metrics.json). Rank 0 logs to `tracking` under
    `stage.name`, with `params` as the run's parameters. `device` None: the local GPU if any,
    else the CPU. A run folder whose final/ already holds `steps` steps returns at once.

    A run folder trained with another `stage.config()` or module specs is an error, unless
    `restart_on_change` (what the pipeline's rules use: they rerun a stage because its parameters
    changed): then its checkpoint, final/ and metrics move to <run_dir>/previous/ and training
    starts afresh."""
    run_dir = Path(run_dir)
    d = Distributed.start(device)
    try:
        with exclusive(run_dir, d):
            ident = identity(stage)
            if restart_on_change and d.main:
                set_aside_if_changed(run_dir, stage.name, ident)
            d.barrier()
            done = finished(run_dir, stage.name, ident, steps)
            return done if done is not None else _train(stage, cfg, steps, run_dir, tracking, params, d, ident)
    finally:
        d.close()


def _train(stage, cfg, steps, run_dir, tracking, params, d: Distributed, ident: dict) -> dict:
    modules, frozen = stage.modules, getattr(stage, "frozen", {})
    for m in modules.values():
        m.to(d.device).train()
    for m in frozen.values():
        m.to(d.device).eval().requires_grad_(False)
    optimizers = stage.optimizers(modules, d.world_size)
    for opt in optimizers.values():
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    start, resumed_from, losses = resume(run_dir, stage.name, ident, steps, modules, optimizers, d, cfg.seed)

    batches = iter(stage.batches(d.rank, d.world_size, _data_seed(cfg.seed, start)))
    if start == 0 and hasattr(stage, "initialize"):
        first = to_device(next(batches), d.device)
        with torch.no_grad():
            stage.initialize({**frozen, **modules}, first)
        batches = itertools.chain([first], batches)
    phases = _phases(modules, frozen, optimizers, d, getattr(stage, "find_unused_parameters", False))
    trained = [p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]
    every = {**frozen, **modules}  # what pictures() and evaluate() see
    autocast, scaler = precision_for(cfg.precision, d.device)
    # What train.precision resolved to here (auto: by the GPU, or by the CPU's bf16 units).
    info = {"stage": stage.name, **ident, "steps": steps, "world_size": d.world_size, "resumed_from": resumed_from,
            "precision": device_precision(cfg.precision, d.device)}
    if not d.main:
        tracking = dataclasses.replace(tracking, enabled=False)
    meter, log_time = Meter(), 0.0

    with (
        StopRequests() as stop,
        stage_run(stage.name, tracking, params) as tracker,
        tqdm(total=steps, initial=start, desc=stage.name, disable=not d.main, dynamic_ncols=True,
             mininterval=0.1 if sys.stderr.isatty() else 30.0) as bar,
    ):  # fmt: skip
        if start:
            tracker.log_metrics({"resumed_from_step": start}, step=start)
        for step in range(start, steps):
            t0 = time.perf_counter()
            micro = [to_device(next(batches), d.device) for _ in range(cfg.grad_accum)]
            scratch = [{} for _ in micro]
            scaled = False
            for phase, opt in optimizers.items():
                ids, view, ddp = phases[phase]
                if hasattr(stage, "lr_factor"):
                    for group in opt.param_groups:
                        group["lr"] = group["initial_lr"] * stage.lr_factor(phase, step)
                with only_trainable(trained, ids):
                    stepped = _accumulate(stage, phase, view, ddp, micro, scratch, step, autocast, scaler, meter)
                if stepped:
                    scaler.step(opt)
                    opt.zero_grad(set_to_none=True)
                    scaled = True
            if scaled:  # one scale for every phase's loss; a pass-through except under fp16
                scaler.update()
            for batch in micro:
                meter.count(counts(stage, batch))
            done = step + 1
            bar.update(1)

            if done % cfg.log_every == 0 or done == steps:
                losses = meter.means()  # reads the tensors: waits for the GPU
                log_time += time.perf_counter() - t0
                losses.update({f"{k}_per_s": n * d.world_size / log_time for k, n in meter.counts.items()})
                lrs = {f"lr/{phase}": opt.param_groups[0]["lr"] for phase, opt in optimizers.items()}
                tracker.log_metrics({**losses, **lrs}, step=done)
                if d.main:  # training curves for the report, with or without a tracking server
                    with open(run_dir / HISTORY, "a") as f:
                        f.write(json.dumps({"step": done, **losses, **lrs}) + "\n")
                bar.set_postfix({k.removeprefix("loss/"): f"{v:.4g}" for k, v in losses.items()
                                 if k.startswith("loss/")}, refresh=False)
                meter, log_time = Meter(), 0.0
            else:
                log_time += time.perf_counter() - t0

            if d.main and tracker.enabled and tracking.log_images and done % cfg.image_every == 0:
                with inference(every.values(), autocast):
                    picture = stage.pictures(every, micro[0])
                if picture is not None:
                    tracker.log_image(picture, f"pictures/step{done:07d}")

            signum = None
            if d.any(stop.signum is not None):
                signum = next(s for s in d.gather(stop.signum) if s is not None)
            if done % cfg.checkpoint_every == 0 and done != steps and signum is None:
                _evaluate(stage, every, autocast, d, tracker, done)
            if done % cfg.checkpoint_every == 0 or done == steps or signum is not None:
                save_checkpoint(run_dir, {**info, "step": done, "losses": losses}, modules, optimizers, d)
            if signum is not None:
                message = (f"{signal.Signals(signum).name}: stopped {stage.name} training at step {done} of {steps}; "
                           f"checkpoint written to {run_dir / CHECKPOINT}. Rerun the same command to resume.")
                if d.main:
                    bar.write(message, file=sys.stderr)
                raise TrainingInterrupted(message, signum)

        eval_metrics = _evaluate(stage, every, autocast, d, tracker, steps)
        digests = d.gather(param_digest(modules))
        if len(set(digests)) > 1:
            raise RuntimeError(f"{stage.name}: the {d.world_size} ranks finished with different weights (parameter "
                               f"digests {digests}); DDP did not keep them in sync, so final/ is not written")
        metrics = {"step": steps, "world_size": d.world_size, "train": losses, "eval": eval_metrics}
        if d.main:
            write_final(run_dir, {**info, "step": steps, "rank_digests": digests}, modules, metrics)
            tracker.log_dict(metrics, "metrics.json")
            tracker.log_weights(run_dir / FINAL)
        return d.broadcast(metrics)  # rank 0 alone evaluated


def _phases(modules, frozen, optimizers, d: Distributed, find_unused: bool) -> dict:
    """phase -> (ids of its parameters, modules as its loss sees them, its DDP wrappers): each
    module wrapped in the phases that train it, bare in the others."""
    wrapped = {n: d.wrap(m, find_unused) for n, m in modules.items()}
    phases = {}
    for phase, opt in optimizers.items():
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        view = {n: wrapped[n] if any(id(p) in ids for p in m.parameters()) else m for n, m in modules.items()}
        phases[phase] = (ids, {**frozen, **view}, [m for m in view.values() if isinstance(m, DDP)])
    return phases


def _accumulate(stage, phase, view, ddp, micro, scratch, step, autocast, scaler, meter) -> bool:
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
                scaler.scale(loss / len(micro)).backward()
                meter.add({f"loss/{phase}": loss})
        meter.add(logs)
        skipped.append(loss is None)
    if any(skipped) and not all(skipped):
        raise ValueError(f"stage {stage.name}, phase {phase}, step {step}: loss() returned None for some "
                         "micro-batches but not all; skip a phase for the whole step or not at all")
    return not skipped[0]


def _evaluate(stage, every, autocast, d: Distributed, tracker, step: int) -> dict[str, float]:
    """Rank 0 evaluates while the others wait at the next collective."""
    if not d.main:
        return {}
    with inference(every.values(), autocast):
        metrics = {k: float(v) for k, v in stage.evaluate(every).items()}
    tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    return metrics


def _data_seed(seed: int, start: int) -> int:
    """The batch stream's seed: `seed` for a fresh run, another one for each resume point, so a
    resumed run does not read the first batches again."""
    return seed if start == 0 else (seed * 1_000_003 + start) % 2**31
